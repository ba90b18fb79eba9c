"""tCURLoRA on a MONAI UNETR or SwinUNETR: fixed tensor-CUR factors C and R, a trainable zero-initialised core U, ΔW = C ∗ U ∗ R.

Shape of the code (after HF peft's VeRA): each tensor group (attention q/k/v/o, MLP up, MLP down) owns one
``TensorCURGroup`` holding C, U and R once, registered on the model as ``model.tcur_groups[<group>]`` (Swin UNETR:
one per group and stage, ``<group>_layers1`` ... ``<group>_layers4``, as the stages differ in width); every wrapped
linear (``TCURLinear``) points to its group and knows which slices of the stacked tensor it is.

Orientation (``TCURLoRAConfig.orientation``): the paper stacks slices as input × output (``y = x W``, "paper", default);
the official code stacks weights as stored, output × input ("official"), so its "columns" are input features.
The forward maths is the same in both: ΔS_k (input × output) = (C ∗ U ∗ R)_k with C = columns and R = rows of the
input × output tensor. "official" only changes the selection: it scores the transposed tensor, whose columns are
our rows. (The official ΔW'_k = (C' ∗ U' ∗ R')_k transposes slice-wise to (R'ᵀ ∗ U'ᵀ ∗ C'ᵀ)_k, i.e. our form with U = U'ᵀ.)

Forward paths (``mode``), all exact, with ``V = U ∗ R`` (r, n2, n3) and ``ΔS_k = sum_j C_{(k-j) mod n3} V_j``:
- "factored": ``x ΔS_k = H_k · Vstack`` with ``H = x · Cflat`` (T, n3·r) re-indexed per slice; never forms ΔS.
  q, k and v of a layer share H. Cheapest when tokens are few (CPU, small crops).
- "materialized": forms ΔS_k (n1, n2) per slice with autograd, then ``x ΔS_k``: autograd then forms the full n1 × n2
  weight gradient of every slice. Kept for checking the others.
- "fused": one custom autograd function per layer (DESIGN.md §1.5, third path): the forward forms ΔS_k without
  autograd and runs the base linear with the merged weight W + ΔS; the backward returns the input gradient through
  that merged weight and ∂L/∂U straight from the factors (``core_grad_from_factors``: x·C and g·Rᵀ, width n3·r).
  Its cost per token is about half the factored path's, plus a fixed cost per step for forming ΔS: it wins when
  tokens are many (GPU, 128³ crops, batch 4) and in inference over many windows.
- "auto": picks per call from a FLOP estimate of the three (training or inference).
See shared/DESIGN.md §1.5 for measured costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import AdapterLayer, ForwardCachedGroup, clear_forward_caches, freeze_for_adapter
from .targets import GROUPS, tensor_groups
from .tensor_cur import (
    apply_t_product_slices,
    circulant_roll,
    core_grad_from_factors,
    select_tensor_cur,
    t_product,
    t_product_slices,
    tensor_cur_delta,
)

__all__ = ["TCURLoRAConfig", "TensorCURGroup", "TCURLinear", "apply_tcurlora"]

MODES = ("auto", "factored", "materialized", "fused")
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
    mode: str = field(default="auto", metadata={"help": "forward path: auto | factored | materialized | fused (same result)"})
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
        # R's slices transposed side by side, (n2, n3·r), block c = R_cᵀ: the fused path's U-gradient uses g · Rflat_T
        self.register_buffer("tcur_Rflat_T", self.tcur_R.permute(1, 2, 0).reshape(n2, -1).contiguous(), persistent=False)
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

    def path(self, tokens: int) -> str:
        """The forward path for ``tokens`` rows of input: ``mode``, or under "auto" the cheapest by a FLOP count
        (multiply-adds beyond the base linear, forward and, when U trains, backward; DESIGN.md §1.5)."""
        if self.mode != "auto":
            return self.mode
        n1, n2, n3 = self.group.shape
        r = self.group.tcur_U.shape[0]
        width, s, T = n3 * r, len(self.slices), tokens
        form = s * n1 * width * n2  # the slices ΔS_k themselves
        if torch.is_grad_enabled() and self.group.tcur_U.requires_grad:
            costs = {"factored": 2 * T * n1 * width + 3 * s * T * width * n2,
                     "materialized": 2 * form + 3 * s * T * n1 * n2,
                     "fused": 2 * form + T * n1 * width + s * T * width * (n2 + 2 * r)}
        else:
            costs = {"factored": T * n1 * width + s * T * width * n2, "materialized": form + s * T * n1 * n2,
                     "fused": form}
        return min(costs, key=costs.get)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        path = self.path(x.numel() // x.shape[-1])
        if path == "fused":
            return _FusedLinear.apply(x, self.group.tcur_U, self)
        y = self.base_layer(x)
        return y + self._adapter_output(x, path).to(y.dtype)

    def delta_slices(self) -> Tensor:
        """ΔS_k for this layer's slices: (s, n1, n2), input × output."""
        return t_product_slices(self.group.tcur_Cflat, self.tcur_roll, self.group.Vstack())

    def adapter_output(self, x: Tensor) -> Tensor:
        """x · ΔS_k for each owned slice, concatenated like the base output: (..., n1) -> (..., s·n2)."""
        path = self.path(x.numel() // x.shape[-1])
        return self._adapter_output(x, "factored" if path == "fused" else path)

    def _adapter_output(self, x: Tensor, path: str) -> Tensor:
        n1, n2, _ = self.group.shape
        s = len(self.slices)
        lead = x.shape[:-1]
        tokens = x.numel() // n1
        if path == "materialized":
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


def _merged_weight(layer: TCURLinear) -> Tensor:
    """W + ΔS in the base linear's layout (s·n2, n1), without autograd."""
    weight = layer.base_layer.weight
    with torch.no_grad():
        return weight + layer.delta_slices().transpose(1, 2).reshape(weight.shape).to(weight.dtype)


class _FusedLinear(torch.autograd.Function):
    """``TCURLinear`` in one autograd node: y = x (W + ΔS)ᵀ + b with ΔS formed without autograd.

    Backward: grad_x through the same merged weight, formed again (it would cost n1 × s·n2 floats per layer to keep:
    a third of a GB for ViT-B, more than LoRA r=32 keeps), ∂L/∂U from x · Cflat and g · Rflat_T
    (``core_grad_from_factors``). Under bf16 autocast the merged product runs like the base linear
    (``F.linear``) and the backward's large products run in the gradient's dtype; ∂L/∂U is summed in fp32.
    """

    @staticmethod
    def forward(ctx, x: Tensor, U: Tensor, layer: TCURLinear) -> Tensor:
        base = layer.base_layer
        if base.weight.requires_grad:  # this node returns no weight gradient
            raise RuntimeError("tCURLoRA mode 'fused' needs a frozen base weight; use mode 'factored' to train it too")
        ctx.layer = layer
        ctx.save_for_backward(x)  # x only, as a LoRA layer keeps: the merged weight is formed again in backward
        return F.linear(x, _merged_weight(layer), base.bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (x,) = ctx.saved_tensors
        layer, group = ctx.layer, ctx.layer.group
        grad_x = grad_U = None
        if ctx.needs_input_grad[0]:
            # V = U ∗ R comes from the pass's cache (U has not changed since the forward)
            grad_x = (grad_out @ _merged_weight(layer).to(grad_out.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            n1, n2, n3 = group.shape
            dt = grad_out.dtype
            x2 = x.reshape(-1, n1).to(dt)
            g = grad_out.reshape(x2.shape[0], len(layer.slices), n2)
            P = x2 @ group.tcur_Cflat.to(dt)  # (T, n3·r): x C_a side by side
            Q = g @ group.tcur_Rflat_T.to(dt)  # (T, s, n3·r): g_i R_cᵀ side by side
            acc = torch.promote_types(dt, torch.float32)  # bf16 products, summed in fp32 (or the model's fp64)
            grad_U = core_grad_from_factors(P.to(acc), Q.to(acc), layer.slices, n3).to(group.tcur_U.dtype)
        return grad_x, grad_U, None


def apply_tcurlora(model: nn.Module, **options) -> dict:
    """Add tCURLoRA to a MONAI UNETR or SwinUNETR in place (see ``TCURLoRAConfig``); returns the resolved options.

    Freezes everything, then trains the U of each tensor, the decoder (UNETR ``decoder2..5``, Swin UNETR
    ``decoder1..5``) and, with ``train_out``, the ``out`` head. Adapter parameters: r² · Σ n3 over the tensors, i.e.
    r² · 6 · L for a UNETR of L blocks (ViT-B, r = 8: 4,608) and r² · 6 · Σ depths for a Swin UNETR (depths 2-2-2-2,
    r = 8: 3,072).
    """
    config = TCURLoRAConfig(**options)
    freeze_for_adapter(model, train_out=config.train_out)
    groups = nn.ModuleDict()
    for name, group, targets in tensor_groups(model, config.groups,
                                              lambda W: TensorCURGroup(W, config.rank, config.orientation)):
        groups[name] = group
        for target in targets:
            parent_path, _, attr = target.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, attr, TCURLinear(getattr(parent, attr), group, target.slices, config.mode))
    model.tcur_groups = groups
    model.register_forward_pre_hook(clear_forward_caches)
    return config.to_dict()
