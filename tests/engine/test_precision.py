"""trainer.precision=bf16: autocast really runs (on a CPU too) and the adapter's parameters and factors stay fp32."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceLoss
from omegaconf import OmegaConf

from tcurlora_seg.adapters import apply_adapter
from tcurlora_seg.adapters.base import clear_forward_caches
from tcurlora_seg.engine.trainer import Autocast, with_precision
from tcurlora_seg.errors import UserError
from tests.conftest import make_tiny_unetr


def _tiny_tcurlora(seed: int = 0, mode: str = "auto") -> torch.nn.Module:
    model = make_tiny_unetr(seed=seed)
    apply_adapter(model, "tcurlora", rank=2, mode=mode)
    with torch.no_grad():  # a trained-looking U, so that ΔW and U's gradient are not trivially zero
        generator = torch.Generator().manual_seed(1)
        for group in model.tcur_groups.values():
            group.tcur_U.copy_(0.05 * torch.randn(group.tcur_U.shape, generator=generator))
    return model


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    inner = getattr(model, "module", model)  # the parameters' own names, not the Autocast wrapper's
    inner.zero_grad()
    loss = DiceLoss(to_onehot_y=True, softmax=True)(model(x), y)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["auto", "fused"])  # auto: factored here; fused: one custom autograd node per layer
def test_bf16_runs_the_vit_in_bf16_and_keeps_u_and_its_factors_fp32(mode):
    model = _tiny_tcurlora(mode=mode)
    seen = []
    model.vit.blocks[0].mlp.linear1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    y = (torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3)) > 0.8).long()
    loss32, grads32 = _loss_and_grads(model, x, y)
    bf16 = Autocast(model, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model.tcur_groups["attn"].V()
    assert v.dtype == torch.float32  # C * U * R is formed in fp32 even inside the autocast region
    loss16, grads16 = _loss_and_grads(bf16, x, y)
    assert seen == [torch.float32, torch.bfloat16]  # autocast really ran (MONAI's amp would not, on a CPU)
    assert bf16(x).dtype == torch.float32  # the loss sees fp32
    assert abs(loss16 - loss32) < 0.02
    for name, group in model.tcur_groups.items():
        assert group.tcur_U.dtype == torch.float32 and group.tcur_U.grad.dtype == torch.float32
        assert torch.isfinite(group.tcur_U.grad).all()
    # U's gradient is as good as the frozen base's own would be: compare with full fine-tuning of the same model
    full = make_tiny_unetr(seed=0)
    apply_adapter(full, "full")
    _, full32 = _loss_and_grads(full, x, y)
    _, full16 = _loss_and_grads(Autocast(full, "cpu"), x, y)
    base_error = max(_relative(full16[n], full32[n]) for n in full32 if n.startswith("vit.blocks.") and n.endswith("weight")
                     and full32[n].dim() == 2)
    for name in model.tcur_groups:
        key = f"tcur_groups.{name}.tcur_U"
        assert _relative(grads16[key], grads32[key]) < 1.5 * base_error, (name, base_error)


def test_precision_switch():
    cfg = OmegaConf.create({"trainer": {"precision": "fp32"}})
    model = torch.nn.Linear(2, 2)
    assert with_precision(cfg, model, torch.device("cpu")) is model
    cfg.trainer.precision = "bf16"
    wrapped = with_precision(cfg, model, torch.device("cpu"))
    assert isinstance(wrapped, Autocast) and wrapped.module is model
    cfg.trainer.precision = "fp16"
    with pytest.raises(UserError, match="trainer.precision='fp16'"):
        with_precision(cfg, model, torch.device("cpu"))


def test_bf16_training_run_end_to_end(tmp_path, official_dataset):
    from tests.test_train import tiny_run, train

    run = tmp_path / "run"
    result = train(tmp_path, *tiny_run(official_dataset, "trainer.precision=bf16", "trainer.max_epochs=1",
                                       f"hydra.run.dir={run}"))
    assert result.returncode == 0, result.stderr[-2000:]
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    u = last["adapter"]["state_dict"]["tcur_groups.attn.tcur_U"]
    assert u.dtype == torch.float32 and torch.isfinite(u).all() and u.abs().sum() > 0


@pytest.mark.parametrize("mode", ["auto", "fused"])
def test_bf16_on_swin_unetr_runs_its_blocks_in_bf16_and_keeps_each_stages_u_fp32(mode):
    """The same autocast path on Swin UNETR's windowed attention (the transformer alone, 32³): every stage's U and its
    gradient stay fp32 and the gradient stays close to the fp32 one."""
    from tests.adapters.test_swin import tiny_swin

    model = apply_adapter(tiny_swin(), "tcurlora", rank=4, mode=mode)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for group in model.tcur_groups.values():
            group.tcur_U.copy_(0.05 * torch.randn(group.tcur_U.shape, generator=generator))
    seen = []
    model.swinViT.layers2[0].blocks[0].mlp.linear1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))

    def core_grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        clear_forward_caches(model, ())  # what model(x) does first; here the transformer is called directly
        # a fixed random projection of every stage's output (its square would be constant: the outputs are normalised)
        outputs = model.swinViT(x, model.normalize)
        weights = [torch.randn(h.shape, generator=torch.Generator().manual_seed(4 + i)) for i, h in enumerate(outputs)]
        sum((h.float() * w).mean() for h, w in zip(outputs, weights)).backward()
        return {name: group.tcur_U.grad.clone() for name, group in model.tcur_groups.items()}

    fp32 = core_grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = core_grads()
    assert seen == [torch.float32, torch.bfloat16]
    for name, grad in bf16.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert _relative(grad, fp32[name]) < 0.1, name
