"""LoRA, DoRA and PiSSA through HF peft (one peft ``LoraConfig`` each) on the ViT linears of a MONAI UNETR.

Per adapted linear (in → out; MONAI's fused ``attn.qkv`` is one 768 → 2304 matrix, as peft sees it):
- LoRA: ΔW = (alpha / r) · B A, A (r, in) random, B (out, r) zero: zero effect at init. Trainable r·(in + out).
- DoRA: LoRA's direction plus a magnitude vector (out,) initialised to the column norms of W: r·(in + out) + out.
- PiSSA: A, B = the top-r singular triplets of W (√S split between them), the base weight becomes the residual
  W − (alpha / r) · B A (frozen). Output at init = base output up to float rounding. Trainable r·(in + out).
Defaults (DESIGN.md §2): LoRA r = 32, PiSSA r = 2 (the paper's Table 1); alpha = r, i.e. scaling 1 (PiSSA's paper
setting, and what keeps PiSSA's A, B exactly the √S-scaled singular vectors). DoRA, not in the paper: LoRA's r = 32.

PiSSA adapter files. The frozen residual is not the pretrained weight, so A and B alone do not reproduce the model
on an untouched base. The file also carries the initial factors (``pissa_A0``, ``pissa_B0``, r·(in + out) per linear,
as small as the adapter): on load the adapter is applied to the pretrained base and the residual is rebuilt as
W_pretrained − scaling · B0 A0 from the saved factors (``restore_pissa_init``), so the result does not depend on the
SVD being bit-identical on the loading machine (sign flips, other BLAS). The base fingerprint is that of the
pretrained weights (taken before the SVD), so a file is refused on any other base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .backbones import linear_paths
from .base import VIT_LINEARS, check_choices, check_rank, options_dict
from .hf_peft import inject_peft, target_regex

__all__ = [
    "LoRAConfig",
    "DoRAConfig",
    "PiSSAConfig",
    "apply_lora",
    "apply_dora",
    "apply_pissa",
    "restore_pissa_init",
]

_ADAPTER = "default"  # peft's adapter name; one adapter per model here


@dataclass
class LoRAConfig:
    """Options of ``apply_adapter(model, "lora", **options)``."""

    rank: int = field(default=32, metadata={"help": "r of A (r × in) and B (out × r) (paper: 32)"})
    alpha: float = field(default=32, metadata={"help": "scaling = alpha / rank (default: alpha = rank, scaling 1)"})
    targets: tuple[str, ...] = field(default=VIT_LINEARS, metadata={"help": f"linears in each ViT block, from {list(VIT_LINEARS)}"})
    train_out: bool = field(default=False, metadata={"help": "train the 1×1×1 `out` head (needed when the class count changes)"})

    def __post_init__(self) -> None:
        check_rank(self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"peft.alpha must be a positive number, got {self.alpha!r}")
        self.targets = check_choices("targets", self.targets, VIT_LINEARS)
        if not isinstance(self.train_out, bool):
            raise ValueError(f"peft.train_out must be true or false, got {self.train_out!r}")


@dataclass
class DoRAConfig(LoRAConfig):
    """Options of ``apply_adapter(model, "dora", **options)``: LoRA's, applied as DoRA (magnitude + direction)."""


@dataclass
class PiSSAConfig(LoRAConfig):
    """Options of ``apply_adapter(model, "pissa", **options)``: A, B from the top-r SVD of W, the residual frozen."""

    rank: int = field(default=2, metadata={"help": "r singular triplets per weight (paper: 2)"})
    alpha: float = field(default=2, metadata={"help": "scaling = alpha / rank (default: alpha = rank, scaling 1)"})
    svd_niter: int = field(
        default=0, metadata={"help": "0: full SVD (exact; minutes for ViT-B on a CPU); N > 0: randomised SVD with N iterations"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.svd_niter, bool) or not isinstance(self.svd_niter, int) or self.svd_niter < 0:
            raise ValueError(f"peft.svd_niter must be 0 (full SVD) or a positive integer, got {self.svd_niter!r}")


def _inject(model: nn.Module, config: LoRAConfig, **peft_options) -> list[nn.Module]:
    from peft import LoraConfig

    peft_config = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=target_regex(model, config.targets), **peft_options
    )
    return inject_peft(model, peft_config, config.train_out)


def apply_lora(model: nn.Module, **options) -> dict:
    """LoRA (peft) on the ViT linears, decoder trained; returns the resolved options."""
    config = LoRAConfig(**options)
    _inject(model, config)
    return options_dict(config)


def apply_dora(model: nn.Module, **options) -> dict:
    """DoRA (peft ``use_dora``) on the ViT linears, decoder trained; returns the resolved options."""
    config = DoRAConfig(**options)
    _inject(model, config, use_dora=True)
    return options_dict(config)


def apply_pissa(model: nn.Module, **options) -> dict:
    """PiSSA (peft ``init_lora_weights="pissa"`` or ``"pissa_niter_N"``) on the ViT linears; returns the options.

    Keeps the initial A, B as buffers ``pissa_A0`` / ``pissa_B0`` on each layer: the adapter file needs them to
    rebuild the residual base (module docstring). Because of that, the randomised SVD (``svd_niter``) is as portable
    as the full one: loading never re-runs the SVD's result, only the file's.
    """
    config = PiSSAConfig(**options)
    for path in linear_paths(model, config.targets):
        linear = model.get_submodule(path)
        if isinstance(linear, nn.Linear) and config.rank > min(linear.weight.shape):
            raise ValueError(f"peft.rank={config.rank} exceeds min{tuple(linear.weight.shape)} of {path}; lower peft.rank")
    init = f"pissa_niter_{config.svd_niter}" if config.svd_niter else "pissa"
    for layer in _inject(model, config, init_lora_weights=init):
        layer.register_buffer("pissa_A0", layer.lora_A[_ADAPTER].weight.detach().clone())
        layer.register_buffer("pissa_B0", layer.lora_B[_ADAPTER].weight.detach().clone())
    return options_dict(config)


@torch.no_grad()
def restore_pissa_init(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Rebuild each residual weight from the initial factors saved in an adapter file (``tensors``, by name).

    W_residual ← W_residual + s·B0 A0 (this model's own SVD) − s·B0' A0' (the file's): the residual training used.
    Nothing changes where the factors are bit-identical, so a same-machine round trip is exact.
    """
    for name, layer in model.named_modules():
        if not isinstance(getattr(layer, "pissa_A0", None), Tensor):
            continue
        A0, B0 = tensors[f"{name}.pissa_A0"], tensors[f"{name}.pissa_B0"]
        if torch.equal(A0, layer.pissa_A0.cpu()) and torch.equal(B0, layer.pissa_B0.cpu()):
            continue
        weight = layer.get_base_layer().weight
        scaling = layer.scaling[_ADAPTER]
        own = layer.pissa_B0.float() @ layer.pissa_A0.float()
        saved = B0.to(weight.device).float() @ A0.to(weight.device).float()
        weight.add_((scaling * (own - saved)).to(weight.dtype))
        layer.pissa_A0.copy_(A0)
        layer.pissa_B0.copy_(B0)
