"""Two optimizer groups: the head (decoder2..5, out) at optim.lr, the method's own tensors at optim.adapter_lr."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tcurlora_seg.adapters import ADAPTERS, apply_adapter, trainable_groups
from tcurlora_seg.engine.trainer import group_settings, param_groups
from tcurlora_seg.errors import UserError
from tests.conftest import make_tiny_unetr

HEAD = ("decoder2.", "decoder3.", "decoder4.", "decoder5.", "out.")
# what each method's own tensors are called (only to check trainable_groups, which decides by module, not by name)
OWN = {"full": ("vit.", "encoder1.", "encoder2.", "encoder3.", "encoder4."), "decoder_only": (),
       "lora": ("lora_",), "dora": ("lora_",), "pissa": ("lora_",), "loha": ("hada_",), "lokr": ("lokr_",),
       "curlora": ("cur_U",), "lora_pt": ("lorapt_",), "tcurlora": ("tcur_U",)}
SMALL_RANK = {"lora": 2, "dora": 2, "loha": 2, "lokr": 2, "tcurlora": 2, "lora_pt": 2}


def optim(**values):
    return OmegaConf.create({"lr": 1e-3, "weight_decay": 1e-5, "adapter_lr": None, "adapter_weight_decay": None, **values})


def adapted(method: str) -> torch.nn.Module:
    model = make_tiny_unetr(seed=0)
    options = {"rank": SMALL_RANK[method]} if method in SMALL_RANK else {}
    return apply_adapter(model, method, **options)


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_every_method_is_covered():
    assert set(OWN) == set(ADAPTERS)


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_groups_split_the_head_from_the_methods_own_tensors(method):
    model = adapted(method)
    adapter, head = trainable_groups(model)
    adapter_names, head_names = names(model, adapter), names(model, head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_names | head_names == trainable and not adapter_names & head_names
    assert head_names and all(n.startswith(HEAD) for n in head_names)
    assert {n for n in trainable if n.startswith(("decoder2.", "decoder5."))} <= head_names
    if method == "decoder_only":
        assert adapter_names == set()
    else:
        assert adapter_names and all(any(key in n for key in OWN[method]) for n in adapter_names), method
    if method == "full":  # everything the PEFT methods freeze: the ViT, its patch embedding and the skip encoders
        assert any(n.startswith("vit.patch_embedding.") for n in adapter_names)
        assert any(n.startswith("encoder1.") for n in adapter_names)


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_groups_take_the_configured_lr_and_weight_decay(method):
    model = adapted(method)
    groups = param_groups(optim(adapter_lr=3e-2, adapter_weight_decay=0.0), model)
    assert [g["name"] for g in groups] == ["head", "adapter"]
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (1e-3, 1e-5)
    assert (groups[1]["lr"], groups[1]["weight_decay"]) == (3e-2, 0.0)
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 3e-2]


def test_null_falls_back_to_the_shared_settings_and_zero_means_zero():
    assert group_settings(optim()) == {"head": {"lr": 1e-3, "weight_decay": 1e-5}, "adapter": {"lr": 1e-3, "weight_decay": 1e-5}}
    assert group_settings(optim(adapter_lr=0.0))["adapter"]["lr"] == 0.0
    assert group_settings(optim(adapter_weight_decay=0))["adapter"]["weight_decay"] == 0.0


@pytest.mark.parametrize("bad", ["fast", -1e-3, True, float("nan")])
def test_bad_adapter_lr_is_a_user_error_naming_the_key(bad):
    with pytest.raises(UserError, match="optim.adapter_lr"):
        group_settings(optim(adapter_lr=bad))


def _one_step(model, cfg_optim):
    optimizer = torch.optim.Adam(param_groups(cfg_optim, model), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(torch.randn(1, 1, 32, 32, 32)).square().mean().backward()
    optimizer.step()
    return {n: not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["tcurlora", "lora", "full"])
def test_zero_adapter_lr_freezes_the_adapter_and_zero_lr_the_head(method):
    moved = _one_step(adapted(method), optim(adapter_lr=0.0, weight_decay=0.0, adapter_weight_decay=0.0))
    assert not any(v for n, v in moved.items() if not n.startswith(HEAD))  # every adapter tensor as it was
    assert any(v for n, v in moved.items() if n.startswith("decoder2."))  # while the decoder moves
    moved = _one_step(adapted(method), optim(lr=0.0, adapter_lr=1e-3, weight_decay=0.0, adapter_weight_decay=0.0))
    assert not any(v for n, v in moved.items() if n.startswith(HEAD))
    assert any(v for n, v in moved.items() if not n.startswith(HEAD))


def test_train_extra_trains_modules_on_top_at_the_decoders_lr_and_travels_in_the_adapter_file():
    from tcurlora_seg.adapters import adapter_state_dict, load_adapter_state_dict

    model = apply_adapter(make_tiny_unetr(seed=0), "tcurlora", rank=2, train_extra=["encoder1", "vit.patch_embedding"])
    adapter, head = trainable_groups(model)
    assert names(model, adapter) == {n for n, _ in model.named_parameters() if "tcur_U" in n}
    assert {n.split(".")[0] for n in names(model, head)} == {"decoder2", "decoder3", "decoder4", "decoder5", "encoder1", "vit"}
    assert all(p.requires_grad for p in model.vit.patch_embedding.parameters())
    assert not any(p.requires_grad for p in model.vit.blocks.parameters())  # the ViT itself stays frozen
    state = adapter_state_dict(model)
    assert state["options"]["train_extra"] == ["encoder1", "vit.patch_embedding"]
    assert any(k.startswith("encoder1.") for k in state["state_dict"])
    loaded = load_adapter_state_dict(make_tiny_unetr(seed=0), state)  # unfreezes them again, and loads them
    assert all(p.requires_grad for p in loaded.encoder1.parameters())
    assert torch.equal(loaded.encoder1.layer.conv1.conv.weight, model.encoder1.layer.conv1.conv.weight)
    with pytest.raises(ValueError, match="peft.train_extra: UNETR has no module 'encoder9'"):
        apply_adapter(make_tiny_unetr(), "decoder_only", train_extra=["encoder9"])


def test_a_run_from_before_the_two_groups_resumes_with_its_moments_in_place():
    from tcurlora_seg.engine.handlers import two_groups

    model = adapted("tcurlora")
    old = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # the one group of before
    model(torch.randn(1, 1, 32, 32, 32)).square().mean().backward()
    old.step()
    moments = {id(p): old.state[p]["exp_avg"].clone() for p in old.param_groups[0]["params"]}
    new = torch.optim.Adam(param_groups(optim(), model), lr=1e-3)
    new.load_state_dict(two_groups(old.state_dict(), new, model))
    assert [len(g["params"]) for g in new.param_groups] == [len(trainable_groups(model)[1]), len(trainable_groups(model)[0])]
    assert all(torch.equal(new.state[p]["exp_avg"], moments[id(p)]) for g in new.param_groups for p in g["params"])
    assert [g["lr"] for g in new.param_groups] == [1e-3, 1e-3]


def loha_optimizer(optimizer_cls, adapter_weight_decay):
    model = adapted("loha")
    return model, optimizer_cls(param_groups(optim(adapter_lr=1e-2, adapter_weight_decay=adapter_weight_decay), model))


def test_adam_coupled_decay_moves_lohas_gradient_free_factors_a_full_lr_step_towards_zero(volume):
    """Why LoHa dies under the paper's Adam + L2: W2b = 0 leaves W1's factors without loss gradient, so the decay
    term alone reaches Adam, which normalises it to a step of size lr, however small the weight decay."""
    for decay, moved in ((1e-5, True), (0.0, False)):
        model, optimizer = loha_optimizer(torch.optim.Adam, decay)
        w1b = model.vit.blocks[0].mlp.linear1.hada_w1_b["default"]
        before = w1b.detach().clone()
        model(volume).square().mean().backward()
        optimizer.step()
        step = (w1b.detach() - before).abs()
        if moved:  # towards zero by up to lr (less only where wd·p is near Adam's eps): the typical entry by ~lr
            assert torch.all((w1b.detach() - before) * before.sign() < 0) and torch.all(step <= 1e-2 * (1 + 1e-6))
            assert step.median() > 0.9e-2
        else:
            assert torch.all(step == 0)


@pytest.mark.parametrize("optimizer_cls, decay, method, warned", [
    (torch.optim.Adam, 1e-5, "loha", True), (torch.optim.Adam, 0.0, "loha", False),
    (torch.optim.AdamW, 1e-5, "loha", False), (torch.optim.Adam, 1e-5, "lora", False),
])
def test_loha_under_coupled_decay_is_warned_about(caplog, optimizer_cls, decay, method, warned):
    from tcurlora_seg.engine.trainer import warn_coupled_decay

    model = adapted(method)
    optimizer = optimizer_cls(param_groups(optim(adapter_weight_decay=decay), model))
    with caplog.at_level("WARNING", logger="tcurlora_seg"):
        warn_coupled_decay(OmegaConf.create({"peft": {"name": method}}), optimizer)
    assert ("optim.adapter_weight_decay=0" in caplog.text) is warned
