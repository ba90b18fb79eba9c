"""tCURLoRA on a MONAI UNETR: fixed tensor-CUR factors C and R, a trainable zero-initialised core U, ΔW = C ∗ U ∗ R.

Shape of the code (after HF peft's VeRA): each tensor group (attention q/k/v/o, MLP up, MLP down) owns one
``TensorCURGroup`` holding C, U and R once, registered on the model as ``model.tcur_groups[<group>]``; every wrapped
linear (``TCURLinear``) points to its group and knows which slices of the stacked tensor it is.

Orientation (``TCURLoRAConfig.orientation``): the paper stacks slices as input × output (``y = x W``, "paper", default);
the official code stacks weights as stored, output × input ("official"), so its "columns" are input features.
The forward maths is the same in both: ΔS_k (input × output) = (C ∗ U ∗ R)_k with C = columns and R = rows of the
input × output tensor. "official" only changes the selection: it scores the transposed tensor, whose columns are
our rows. (The official ΔW'_k = (C' ∗ U' ∗ R')_k transposes slice-wise to (R'ᵀ ∗ U'ᵀ ∗ C'ᵀ)_k, i.e. our form with U = U'ᵀ.)

Forward paths (``mode``), both exact, with ``V = U ∗ R`` (r, n2, n3) and ``ΔS_k = sum_j C_{(k-j) mod n3} V_j``:
- "factored": ``x ΔS_k = H_k · Vstack`` with ``H = x · Cflat`` (T, n3·r) re-indexed per slice; never forms ΔS.
  q, k and v of a layer share H. Cheapest when tokens are few (CPU, small crops).
- "materialized": forms ΔS_k (n1, n2) per slice, then ``x ΔS_k``. Cheaper when tokens outnumber the weight's width.
- "auto": picks per call from a FLOP estimate of the two.
See shared/DESIGN.md §1.5 for measured costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .base import AdapterLayer, ForwardCachedGroup, clear_forward_caches, freeze_for_adapter
from .targets import GROUPS, group_targets, stack_group
from .tensor_cur import (
    apply_t_product_slices,
    circulant_roll,
    select_tensor_cur,
    t_product,
    t_product_slices,
    tensor_cur_delta,
)

__all__ = ["TCURLoRAConfig", "TensorCURGroup", "TCURLinear", "apply_tcurlora"]

MODES = ("auto", "factored", "materialized")
ORIENTATIONS = ("paper", "official")


@dataclass
class TCURLoRAConfig:
    """Options of ``apply_adapter(model, "tcurlora", **options)``."""

    rank: int = field(default=8, metadata={"help": "r: columns and rows selected per tensor; U is r × r × n3 (paper: 8)"})
    groups: tuple[str, ...] = field(
        default=("attn", "mlp_up", "mlp_down"), metadata={"help": "tensor groups to adapt: attn (q/k/v/o), mlp_up, mlp_down"}
    )
    orientation: str = field(
        default="paper", metadata={"help": "'paper': slices are weight.T (input × output); 'official': weights as stored"}
    )
    mode: str = field(default="auto", metadata={"help": "forward path: auto | factored | materialized (same result)"})
    train_out: bool = field(default=False, metadata={"help": "train the 1×1×1 `out` head (needed when the class count changes)"})

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"peft.rank must be a positive integer, got {self.rank!r}")
        self.groups = tuple(self.groups)
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"peft.groups must list distinct groups from {sorted(GROUPS)}, got {list(self.groups)}")
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"peft.groups has unknown group(s) {unknown}; choose from {sorted(GROUPS)}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"peft.orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
        if self.mode not in MODES:
            raise ValueError(f"peft.mode must be one of {MODES}, got {self.mode!r}")

    def to_dict(self) -> dict:
        """Plain types only, so the options travel inside a ``weights_only`` checkpoint."""
        options = asdict(self)
        options["groups"] = list(self.groups)
        return options


class TensorCURGroup(ForwardCachedGroup):
    """C, U, R of one stacked tensor W̃ (n1, n2, n3), shared by the linears whose slices it holds.

    ``tcur_C`` = W̃[:, cols, :] (n1, r, n3) and ``tcur_R`` = W̃[rows, :, :] (r, n2, n3) are fixed buffers rebuilt from the
    base weights and the saved indices; ``tcur_U`` (r, r, n3) is the only trainable tensor, zero at start.
    """

    def __init__(self, W: Tensor, rank: int, orientation: str = "paper") -> None:
        super().__init__()
        n1, n2, n3 = W.shape
        if rank > min(n1, n2):
            raise ValueError(f"peft.rank={rank} is larger than the smaller side {min(n1, n2)} of a {n1}×{n2}×{n3} tensor; lower peft.rank")
        if orientation == "paper":
            rows, cols = select_tensor_cur(W, rank)
        else:  # score the output × input tensor; its rows are our columns
            cols, rows = select_tensor_cur(W.transpose(0, 1), rank)
        self.register_buffer("tcur_rows", rows)
        self.register_buffer("tcur_cols", cols)
        self.register_buffer("tcur_C", W[:, cols, :].clone(), persistent=False)
        self.register_buffer("tcur_R", W[rows, :, :].clone(), persistent=False)
        # C's slices side by side, (n1, n3·r), block j = C_j: the layout every forward multiplies with
        self.register_buffer("tcur_Cflat", self.tcur_C.permute(0, 2, 1).reshape(n1, -1).contiguous(), persistent=False)
        self.tcur_U = nn.Parameter(torch.zeros(rank, rank, n3, dtype=W.dtype, device=W.device))

    @property
    def shape(self) -> tuple[int, int, int]:
        n1, _, n3 = self.tcur_C.shape
        return n1, self.tcur_R.shape[1], n3

    def V(self) -> Tensor:
        """V = U ∗ R: (r, n2, n3)."""
        return t_product(self.tcur_U, self.tcur_R)

    def Vstack(self) -> Tensor:
        """V's slices stacked, (n3·r, n2), block j = V_j; computed once per forward pass of the model."""

        def stack() -> Tensor:
            V = self.V()
            return V.permute(2, 0, 1).reshape(-1, V.shape[1])

        return self.cached((self.tcur_U,), stack)

    def delta(self) -> Tensor:
        """The full ΔW = C ∗ U ∗ R (n1, n2, n3)."""
        return tensor_cur_delta(self.tcur_C, self.tcur_U, self.tcur_R)

    def extra_repr(self) -> str:
        n1, n2, n3 = self.shape
        return f"W̃={n1}×{n2}×{n3}, rank={self.tcur_U.shape[0]}"


class TCURLinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus x·ΔS_k for the slice(s) k it owns (MONAI's fused qkv owns three: q, k, v)."""

    def __init__(self, base_layer: nn.Linear, group: TensorCURGroup, slices: tuple[int, ...], mode: str = "auto") -> None:
        super().__init__()
        n1, n2, n3 = group.shape
        if base_layer.in_features != n1 or base_layer.out_features != n2 * len(slices):
            raise ValueError(f"linear {base_layer} does not match {len(slices)} slice(s) of a {n1}×{n2}×{n3} tensor")
        self.base_layer = base_layer
        # Not a submodule: the group is registered once on the model, so U appears once in the state dict.
        object.__setattr__(self, "group", group)
        self.slices = tuple(slices)
        self.mode = mode
        self.merged = False
        # sum_j C_{(k-j)} V_j = ΔS_k with V's slices stacked in order j (tensor_cur.circulant_roll)
        self.register_buffer("tcur_roll", circulant_roll(self.slices, n3), persistent=False)

    def _use_factored(self, tokens: int) -> bool:
        if self.mode != "auto":
            return self.mode == "factored"
        n1, n2, n3 = self.group.shape
        width, s = n3 * self.group.tcur_U.shape[0], len(self.slices)
        factored = tokens * n1 * width + s * tokens * width * n2
        materialized = s * n1 * width * n2 + s * tokens * n1 * n2
        return factored <= materialized

    def delta_slices(self) -> Tensor:
        """ΔS_k for this layer's slices: (s, n1, n2), input × output."""
        return t_product_slices(self.group.tcur_Cflat, self.tcur_roll, self.group.Vstack())

    def adapter_output(self, x: Tensor) -> Tensor:
        """x · ΔS_k for each owned slice, concatenated like the base output: (..., n1) -> (..., s·n2)."""
        n1, n2, _ = self.group.shape
        s = len(self.slices)
        lead = x.shape[:-1]
        tokens = x.numel() // n1
        if not self._use_factored(tokens):
            out = torch.einsum("ti,sio->tso", x.reshape(tokens, n1), self.delta_slices().to(x.dtype))
            return out.reshape(*lead, s * n2)
        out = apply_t_product_slices(x.reshape(tokens, n1), self.group.tcur_Cflat.to(x.dtype), self.tcur_roll,
                                     self.group.Vstack().to(x.dtype))
        return out.reshape(*lead, s * n2)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        weight = self.base_layer.weight  # (s*n2, n1): output × input, chunks [q; k; v]
        delta = self.delta_slices().transpose(1, 2).reshape(weight.shape)  # ΔS_kᵀ per chunk
        weight.add_(delta.to(weight.dtype), alpha=sign)

    def merge(self) -> None:
        """Fold ΔW into the base weight: the layer then costs exactly the base linear."""
        if not self.merged:
            self._fold(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW again: restores the pretrained weight up to float rounding."""
        if self.merged:
            self._fold(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"slices={list(self.slices)}, mode={self.mode}, merged={self.merged}"


def apply_tcurlora(model: nn.Module, **options) -> dict:
    """Add tCURLoRA to a MONAI UNETR in place (see ``TCURLoRAConfig``); returns the resolved options.

    Freezes everything, then trains the U of each group, ``decoder2..5`` and, with ``train_out``, the ``out`` head.
    """
    config = TCURLoRAConfig(**options)
    freeze_for_adapter(model, train_out=config.train_out)
    groups = nn.ModuleDict()
    for name in config.groups:
        targets = group_targets(model, name)
        group = TensorCURGroup(stack_group(model, targets), config.rank, config.orientation)
        groups[name] = group
        for target in targets:
            parent_path, _, attr = target.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, attr, TCURLinear(getattr(parent, attr), group, target.slices, config.mode))
    model.tcur_groups = groups
    model.register_forward_pre_hook(clear_forward_caches)
    return config.to_dict()
