"""Every method of the registry on a plain MONAI SwinUNETR (feature 12, depths 2-2-2-2: widths 12, 24, 48, 96).

Mirrors the UNETR tests (test_baselines.py, test_tcurlora.py). Most checks run the transformer alone
(``model.swinViT`` on 32³: every stage's hidden states) because the full network needs 64³ inputs (its instance-norm
bottleneck holds one voxel at 32³) and costs seconds per pass; one test trains the whole network at 64³.
"""

import io

import pytest
import torch
from monai.networks.nets import SwinUNETR, UNETR

from tcurlora_seg.adapters import (
    adapter_layers,
    adapter_state_dict,
    apply_adapter,
    count_trainable,
    load_adapter_state_dict,
    merge_adapter,
    unmerge_adapter,
)
from tcurlora_seg.adapters.backbones import BACKBONES, backbone_of, linear_paths
from tcurlora_seg.adapters.targets import group_targets, stack_group
from tcurlora_seg.adapters.tensor_cur import select_tensor_cur, tensor_cur_delta
from tests.adapters.test_baselines import EXACT_AT_INIT, LAYERED, METHODS, adapter_count, is_adapter_tensor, randomise_adapter

WIDTHS, DEPTHS = (12, 24, 48, 96), (2, 2, 2, 2)
DECODER = BACKBONES["swin_unetr"].decoder


def tiny_swin(seed: int = 0) -> SwinUNETR:
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=DEPTHS, num_heads=(3, 6, 12, 24))


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(1, 1, 32, 32, 32)


def encoded(model, x):
    """Every stage's output of the transformer, flattened and joined: what the decoder reads."""
    model.eval()
    with torch.no_grad():
        return torch.cat([h.flatten() for h in model.swinViT(x, model.normalize)])


def swin_adapter_count(method: str) -> int:
    """Adapter parameters at default options: UNETR's per-block formulas, stage by stage (width w, MLP 4w)."""
    return sum(adapter_count(method, hidden=w, mlp=4 * w, blocks=d) for w, d in zip(WIDTHS, DEPTHS))


def test_backbone_is_recognised_from_the_module():
    assert backbone_of(tiny_swin()).name == "swin_unetr"
    assert backbone_of(UNETR(1, 2, (32, 32, 32), hidden_size=48, mlp_dim=96, num_heads=3)).name == "unetr"
    with pytest.raises(ValueError, match="vit.blocks.*swinViT"):
        backbone_of(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    paths = linear_paths(tiny_swin(), ("attn.out_proj",))
    assert paths[0] == "swinViT.layers1.0.blocks.0.attn.proj" and len(paths) == sum(DEPTHS)


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_matches_formula(method):
    model = tiny_swin()
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for name in DECODER for p in getattr(model, name).parameters())
    apply_adapter(model, method)
    expected = total if method == "full" else decoder + swin_adapter_count(method)
    assert count_trainable(model) == expected


def test_tcurlora_has_three_tensors_per_stage_and_r2_6_sum_depths_parameters():
    model = apply_adapter(tiny_swin(), "tcurlora", rank=8)
    shapes = {name: group.shape for name, group in model.tcur_groups.items()}
    for stage, w in enumerate(WIDTHS, start=1):
        assert shapes[f"attn_layers{stage}"] == (w, w, 4 * DEPTHS[stage - 1])  # q, k, v, proj of the stage's blocks
        assert shapes[f"mlp_up_layers{stage}"] == (w, 4 * w, DEPTHS[stage - 1])
        assert shapes[f"mlp_down_layers{stage}"] == (4 * w, w, DEPTHS[stage - 1])
    assert len(shapes) == 12
    assert sum(g.tcur_U.numel() for g in model.tcur_groups.values()) == 8 * 8 * 6 * sum(DEPTHS) == 3072
    # neither the patch embedding nor patch merging is adapted
    wrapped = {name for name, m in model.named_modules() if m in adapter_layers(model)}
    assert len(wrapped) == 4 * sum(DEPTHS) and all(".blocks." in name for name in wrapped)
    assert not any(p.requires_grad for p in model.swinViT.layers1[0].downsample.parameters())


def test_stage_slices_follow_q_k_v_proj_order():
    model = tiny_swin()
    targets = group_targets(model, "attn")["attn_layers2"]
    assert [t.path for t in targets[:2]] == ["swinViT.layers2.0.blocks.0.attn.qkv", "swinViT.layers2.0.blocks.0.attn.proj"]
    W = stack_group(model, targets)
    block = model.swinViT.layers2[0].blocks[1]
    torch.testing.assert_close(W[:, :, 4 + 2], block.attn.qkv.weight[48:72].T)  # v of the stage's second block
    torch.testing.assert_close(W[:, :, 4 + 3], block.attn.proj.weight.T)


@pytest.mark.parametrize("method", ["tcurlora", "lora_pt"])
def test_rank_above_a_stage_width_names_the_stage(method):
    with pytest.raises(ValueError, match=r"tensor attn_layers1 \(swinViT\.layers1\.0\.blocks\.0\.attn\.qkv.*rank=16"):
        apply_adapter(tiny_swin(), method, rank=16)  # the first stage is 12 wide


def test_every_tcurlora_forward_path_is_exact_on_windowed_attention(x):
    """factored / materialized / fused / auto give x W + x (C ∗ U ∗ R)_k, the definition computed here (float64)."""
    pristine = tiny_swin().double()
    stacked = {n: stack_group(pristine, t).double() for n, t in group_targets(pristine, "attn").items()}
    outputs = {}
    for mode in ("factored", "materialized", "fused", "auto"):
        model = apply_adapter(tiny_swin(), "tcurlora", rank=4, mode=mode).double()  # C, R, U in float64 too
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for group in model.tcur_groups.values():
                group.tcur_U.copy_(torch.randn(group.tcur_U.shape, generator=gen, dtype=torch.float64) * 0.3)
        outputs[mode] = encoded(model, x.double())
    for mode in ("materialized", "fused", "auto"):
        torch.testing.assert_close(outputs[mode], outputs["factored"], rtol=1e-9, atol=1e-9)
    # the merged weights against the definition, for every attention tensor
    merge_adapter(model)
    for name, W in stacked.items():
        rows, cols = select_tensor_cur(W, 4)
        delta = tensor_cur_delta(W[:, cols], model.tcur_groups[name].tcur_U.detach(), W[rows])
        targets = group_targets(model, "attn")[name]
        qkv = model.get_submodule(targets[0].path).base_layer.weight  # (3w, w), merged
        torch.testing.assert_close(qkv[: W.shape[1]].T, W[:, :, 0] + delta[:, :, 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(encoded(model, x.double()), outputs["factored"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_zero_effect_at_init(x, method):
    base = encoded(tiny_swin(), x)
    tol = 0 if method in EXACT_AT_INIT else 1e-4
    torch.testing.assert_close(encoded(apply_adapter(tiny_swin(), method), x), base, atol=tol, rtol=tol)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "decoder_only"])
def test_gradient_reaches_every_adapter_tensor_and_frozen_weights_stay(x, method):
    model = apply_adapter(tiny_swin(), method)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    own = {n: p.detach().clone() for n, p in model.named_parameters()
           if p.requires_grad and (n.startswith("swinViT.") or is_adapter_tensor(n))}
    assert own
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # a zero-initialised factor blocks its partner's gradient in the first step
        optimizer.zero_grad()
        sum(h.square().mean() for h in model.swinViT(x, model.normalize)).backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    unchanged = [n for n, value in own.items() if torch.equal(params[n], value)]
    assert not unchanged, unchanged


@pytest.mark.parametrize("method", LAYERED)
def test_merge_matches_unmerged_output(x, method):
    model = apply_adapter(tiny_swin(), method)
    randomise_adapter(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = encoded(model, x)
    merge_adapter(model)
    torch.testing.assert_close(encoded(model, x), unmerged, atol=1e-4, rtol=1e-4)
    unmerge_adapter(model)
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_reproduces_fine_tuned_model(x, method):
    tuned = apply_adapter(tiny_swin(), method)
    randomise_adapter(tuned)
    with torch.no_grad():
        tuned.decoder1.transp_conv.conv.weight.mul_(1.5)  # a trained decoder weight
    buffer = io.BytesIO()
    torch.save(adapter_state_dict(tuned), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert not {n for n, p in tuned.named_parameters() if not p.requires_grad} & saved["state_dict"].keys()
    fresh = load_adapter_state_dict(tiny_swin(), saved)
    torch.testing.assert_close(encoded(fresh, x), encoded(tuned, x), rtol=0, atol=0)
    assert torch.equal(fresh.decoder1.transp_conv.conv.weight, tuned.decoder1.transp_conv.conv.weight)


def test_training_the_whole_network_moves_every_core_and_no_frozen_weight():
    """One Adam step of the full SwinUNETR at 64³ (its smallest trainable input): every U of every stage moves."""
    model = apply_adapter(tiny_swin(), "tcurlora", rank=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cores = {n: g.tcur_U.detach().clone() for n, g in model.tcur_groups.items()}
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {*DECODER, "tcur_groups"}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(2)
    model.train()
    model(torch.randn(1, 1, 64, 64, 64)).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(g.tcur_U, cores[n]) for n, g in model.tcur_groups.items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_train_extra_unfreezes_swin_parts_in_the_decoders_group():
    from tcurlora_seg.adapters import trainable_groups

    model = apply_adapter(tiny_swin(), "tcurlora", train_extra=["encoder10", "swinViT.patch_embed"])
    own, head = trainable_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in head} == {*DECODER, "encoder10", "swinViT"}
    assert all(names[id(p)].startswith("swinViT.patch_embed.") for p in head if names[id(p)].startswith("swinViT"))
    assert {names[id(p)] for p in own} == {f"tcur_groups.{n}.tcur_U" for n in model.tcur_groups}
    with pytest.raises(ValueError, match=r"no module 'vit.blocks'.*swinViT.patch_embed"):
        apply_adapter(tiny_swin(), "decoder_only", train_extra=["vit.blocks"])
