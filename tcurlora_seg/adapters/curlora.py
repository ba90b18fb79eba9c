"""Matrix CURLoRA (Fawi 2024) on the ViT linears of a MONAI UNETR: ΔW = C U R per weight matrix, U zero-initialised.

Per matrix W (out × in, as ``nn.Linear`` stores it, the CURLoRA code's orientation): C = W[:, J] (out × r) and
R = W[I, :] (r × in) are fixed buffers rebuilt from the base weight and the saved indices; U (r × r) is the only
trainable tensor, zero at start (zero effect at init, ∂L/∂U = Cᵀ G Rᵀ ≠ 0).

Selection (``selection``), deterministic (no sampling, so a run and its adapter file are reproducible):
- "top" (default): the r columns and the r rows of largest squared 2-norm, scored independently: the CURLoRA
  paper's probabilities ∝ squared norms, with their top-r instead of a draw; the same rule tCURLoRA uses.
- "inverted": the r smallest squared norms: the CURLoRA paper's "inverted probabilities" (which it samples; small
  columns and rows bound how far ΔW can move W), again as a deterministic top-r.
Swapping the orientation only transposes ΔW (C ↔ Rᵀ, U ↔ Uᵀ) with independent scores, so no orientation option.

MONAI's fused ``attn.qkv`` (3·d × d) is split into q, k, v by default (``split_qkv``): CURLoRA is defined per weight
matrix and q, k, v are three matrices (tCURLoRA treats them as three slices too). Trainable per linear: s·r² with
s = 3 for a split qkv, else 1. Paper default r = 2: ViT-B 12 · 6 · 4 = 288 (+ decoder 2,678,528 = 2,678,816 ≈ 2.679 M).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .backbones import linear_paths
from .base import VIT_LINEARS, AdapterLayer, check_choices, check_rank, freeze_for_adapter, options_dict

__all__ = ["CURLoRAConfig", "CURLinear", "apply_curlora"]

SELECTIONS = ("top", "inverted")


@dataclass
class CURLoRAConfig:
    """Options of ``apply_adapter(model, "curlora", **options)``."""

    rank: int = field(default=2, metadata={"help": "r columns and rows per matrix; U is r × r (paper: 2)"})
    selection: str = field(default="top", metadata={"help": "'top': largest squared norms; 'inverted': smallest"})
    split_qkv: bool = field(default=True, metadata={"help": "treat MONAI's fused qkv as three matrices q, k, v"})
    targets: tuple[str, ...] = field(default=VIT_LINEARS, metadata={"help": f"linears in each ViT block, from {list(VIT_LINEARS)}"})
    train_out: bool = field(default=False, metadata={"help": "train the 1×1×1 `out` head (needed when the class count changes)"})

    def __post_init__(self) -> None:
        check_rank(self.rank)
        if self.selection not in SELECTIONS:
            raise ValueError(f"peft.selection must be one of {SELECTIONS}, got {self.selection!r}")
        for key in ("split_qkv", "train_out"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"peft.{key} must be true or false, got {getattr(self, key)!r}")
        self.targets = check_choices("targets", self.targets, VIT_LINEARS)


@torch.no_grad()
def select_cur(W: Tensor, rank: int, selection: str = "top") -> tuple[Tensor, Tensor]:
    """(rows, cols) of W (out × in): r indices each, by squared 2-norm, largest ("top") or smallest ("inverted")."""
    sign = 1.0 if selection == "top" else -1.0
    rows = torch.topk(sign * W.float().square().sum(1), rank).indices
    cols = torch.topk(sign * W.float().square().sum(0), rank).indices
    return rows, cols


class CURLinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus x·(C U R)ᵀ per output chunk (three for a split fused qkv)."""

    def __init__(self, base_layer: nn.Linear, rank: int, chunks: int = 1, selection: str = "top") -> None:
        super().__init__()
        out, n_in = base_layer.weight.shape
        if out % chunks:
            raise ValueError(f"cannot split {base_layer} into {chunks} equal matrices")
        if rank > min(out // chunks, n_in):
            raise ValueError(f"peft.rank={rank} exceeds min({out // chunks}, {n_in}) of a weight matrix; lower peft.rank")
        self.base_layer = base_layer
        W = base_layer.weight.detach().float().view(chunks, out // chunks, n_in)  # (s, out_c, in)
        rows, cols = zip(*(select_cur(Wc, rank, selection) for Wc in W))
        self.register_buffer("cur_rows", torch.stack(rows))  # (s, r)
        self.register_buffer("cur_cols", torch.stack(cols))  # (s, r)
        self.register_buffer("cur_C", torch.stack([Wc[:, j] for Wc, j in zip(W, cols)]), persistent=False)  # (s, out_c, r)
        self.register_buffer("cur_R", torch.stack([Wc[i, :] for Wc, i in zip(W, rows)]), persistent=False)  # (s, r, in)
        self.cur_U = nn.Parameter(torch.zeros(chunks, rank, rank, device=W.device))
        self.merged = False

    def delta_weight(self) -> Tensor:
        """ΔW = C U R per chunk, stacked like the base weight: (s·out_c, in)."""
        return (self.cur_C @ self.cur_U @ self.cur_R).flatten(0, 1)

    def adapter_output(self, x: Tensor) -> Tensor:
        """x (C U R)ᵀ = ((x Rᵀ) Uᵀ) Cᵀ per chunk, never forming ΔW: (..., in) -> (..., s·out_c)."""
        s, r, n_in = self.cur_R.shape
        h = (x @ self.cur_R.to(x.dtype).reshape(s * r, n_in).T).unflatten(-1, (s, r))  # (..., s, r)
        h = torch.einsum("...sr,sqr->...sq", h, self.cur_U.to(x.dtype))  # h Uᵀ
        return torch.einsum("...sq,soq->...so", h, self.cur_C.to(x.dtype)).flatten(-2)  # (..., s*out_c)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight."""
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW again (pretrained weight up to float rounding)."""
        if self.merged:
            self.base_layer.weight.sub_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        s, r, _ = self.cur_R.shape
        return f"matrices={s}, rank={r}, merged={self.merged}"


def apply_curlora(model: nn.Module, **options) -> dict:
    """Wrap the targeted transformer linears with ``CURLinear``; train U, the decoder (and ``out``); returns the options."""
    config = CURLoRAConfig(**options)
    freeze_for_adapter(model, train_out=config.train_out)
    for path in linear_paths(model, config.targets):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        chunks = 3 if path.endswith(".attn.qkv") and config.split_qkv else 1
        setattr(parent, attr, CURLinear(getattr(parent, attr), config.rank, chunks, config.selection))
    return options_dict(config)
