"""LoRA-PT (He, Cheng, Zhu & Yu, arXiv 2407.11292): train the principal t-SVD part of tCURLoRA's three tensors.

Same stacked tensors as tCURLoRA (``targets.tensor_groups``: attention q/k/v/o, MLP up, MLP down, per stage
on Swin UNETR; slices input × output). For each W̃ (n1, n2, n3), t-SVD per frequency of ``rfft(W̃)`` along the slices:
Ŵ_f = Û_f Ŝ_f V̂_fᴴ, truncated to the top r singular triplets. In the spatial domain (what trains):
  U = irfft(Û_r) (n1, r, n3),  S = irfft(Ŝ_r) (r, r, n3, f-diagonal at init),  V = irfft(V̂_rᴴ) (r, n2, n3),
so that U ∗ S ∗ V = the principal part P (exactly: the DC and Nyquist frequencies take a real SVD, so every
factor's spectrum is conjugate-symmetric and irfft loses nothing; the official code's complex SVD at DC does not
guarantee this). The residual W̃ − P replaces the base weights and stays frozen; U, S and V train (the official
code's ``lorapt_U/S/V_weight``, S a full r × r × n3 tensor). W = residual + U ∗ S ∗ V, so outputs at init equal the
base model up to float rounding.

Trainable per group: r·n3·(n1 + r + n2). Default r = 8 (tCURLoRA's rank on the same tensors; the official code's
``lora_dim`` default is 32, i.e. ``rank=32``). ViT-B r = 8: 592,896 + 369,408 + 369,408 = 1,331,712 (+ decoder).

Forward (factored, exact, like tCURLoRA's): with V' = S ∗ V (once per model forward, shared by the group),
x·(U ∗ V')_k = H_k · V'stack, H = x · Uflat re-indexed per slice k. Adapter files carry the initial U0, S0, V0 so
the residual is rebuilt from the pretrained base exactly (``restore_lora_pt_init``), like PiSSA's (see ``lora.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import (
    AdapterLayer,
    ForwardCachedGroup,
    check_choices,
    check_rank,
    clear_forward_caches,
    freeze_for_adapter,
    options_dict,
)
from .targets import GROUPS, tensor_groups
from .tensor_cur import apply_t_product_slices, circulant_roll, t_product, t_product_slices

__all__ = ["LoRAPTConfig", "principal_tsvd", "LoRAPTGroup", "LoRAPTLinear", "apply_lora_pt", "restore_lora_pt_init"]


@dataclass
class LoRAPTConfig:
    """Options of ``apply_adapter(model, "lora_pt", **options)``."""

    rank: int = field(default=8, metadata={"help": "r principal singular triplets per frequency (official code: 32)"})
    groups: tuple[str, ...] = field(
        default=("attn", "mlp_up", "mlp_down"), metadata={"help": "tensor groups to adapt: attn (q/k/v/o), mlp_up, mlp_down"}
    )
    train_out: bool = field(default=False, metadata={"help": "train the 1×1×1 `out` head (needed when the class count changes)"})

    def __post_init__(self) -> None:
        check_rank(self.rank)
        self.groups = check_choices("groups", self.groups, tuple(GROUPS))
        if not isinstance(self.train_out, bool):
            raise ValueError(f"peft.train_out must be true or false, got {self.train_out!r}")


@torch.no_grad()
def principal_tsvd(W: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r t-SVD factors of W (n1, n2, n3), real: U (n1, r, n3), S (r, r, n3), V (r, n2, n3); U ∗ S ∗ V = principal part."""
    n1, n2, n3 = W.shape
    if rank > min(n1, n2):
        raise ValueError(f"peft.rank={rank} is larger than the smaller side {min(n1, n2)} of a {n1}×{n2}×{n3} tensor; lower peft.rank")
    Wf = torch.fft.rfft(W.float(), dim=-1).permute(2, 0, 1)  # (F, n1, n2)
    Uf, Sf, Vhf = torch.linalg.svd(Wf, full_matrices=False)
    # DC (and Nyquist for even n3) are real: a real SVD there keeps the factors' spectra conjugate-symmetric
    real_bins = [0, n3 // 2] if n3 % 2 == 0 else [0]
    for f in real_bins:
        U, S, Vh = torch.linalg.svd(Wf[f].real, full_matrices=False)
        Uf[f], Sf[f], Vhf[f] = U.to(Uf.dtype), S, Vh.to(Vhf.dtype)
    Uf, Sf, Vhf = Uf[..., :rank], Sf[:, :rank], Vhf[:, :rank, :]
    U = torch.fft.irfft(Uf.permute(1, 2, 0), n=n3, dim=-1)  # (n1, r, n3)
    S = torch.fft.irfft(torch.diag_embed(Sf).to(Uf.dtype).permute(1, 2, 0), n=n3, dim=-1)  # (r, r, n3)
    V = torch.fft.irfft(Vhf.permute(1, 2, 0), n=n3, dim=-1)  # (r, n2, n3)
    return U.to(W.dtype), S.to(W.dtype), V.to(W.dtype)


class LoRAPTGroup(ForwardCachedGroup):
    """U, S, V of one stacked tensor (trainable) and their initial values U0, S0, V0 (buffers, saved with the adapter)."""

    def __init__(self, W: Tensor, rank: int) -> None:
        super().__init__()
        U, S, V = principal_tsvd(W, rank)
        self.lorapt_U = nn.Parameter(U.clone())
        self.lorapt_S = nn.Parameter(S.clone())
        self.lorapt_V = nn.Parameter(V.clone())
        self.register_buffer("lorapt_U0", U)
        self.register_buffer("lorapt_S0", S)
        self.register_buffer("lorapt_V0", V)

    @property
    def shape(self) -> tuple[int, int, int]:
        n1, _, n3 = self.lorapt_U.shape
        return n1, self.lorapt_V.shape[1], n3

    def initial_principal(self) -> Tensor:
        """U0 ∗ S0 ∗ V0: the part taken out of the base weights at init, (n1, n2, n3)."""
        return t_product(self.lorapt_U0, t_product(self.lorapt_S0, self.lorapt_V0))

    def factors(self) -> tuple[Tensor, Tensor]:
        """(Uflat (n1, n3·r), V'stack (n3·r, n2)) with V' = S ∗ V; once per model forward (cache as in tCURLoRA)."""

        def compute() -> tuple[Tensor, Tensor]:
            n1, r, n3 = self.lorapt_U.shape
            Vp = t_product(self.lorapt_S, self.lorapt_V)  # (r, n2, n3)
            Uflat = self.lorapt_U.permute(0, 2, 1).reshape(n1, n3 * r)  # block j = U_j
            return Uflat, Vp.permute(2, 0, 1).reshape(n3 * r, -1)

        return self.cached((self.lorapt_U, self.lorapt_S, self.lorapt_V), compute)

    def extra_repr(self) -> str:
        n1, n2, n3 = self.shape
        return f"W̃={n1}×{n2}×{n3}, rank={self.lorapt_U.shape[1]}"


class LoRAPTLinear(AdapterLayer):
    """A frozen ``nn.Linear`` holding the residual slice(s), plus x·(U ∗ S ∗ V)_k for the slice(s) k it owns."""

    def __init__(self, base_layer: nn.Linear, group: LoRAPTGroup, slices: tuple[int, ...]) -> None:
        super().__init__()
        n1, n2, n3 = group.shape
        if base_layer.in_features != n1 or base_layer.out_features != n2 * len(slices):
            raise ValueError(f"linear {base_layer} does not match {len(slices)} slice(s) of a {n1}×{n2}×{n3} tensor")
        self.base_layer = base_layer
        object.__setattr__(self, "group", group)  # registered once on the model, not per layer
        self.slices = tuple(slices)
        self.merged = False
        # (U ∗ V')_k = sum_j U_{(k-j) mod n3} V'_j (tensor_cur.circulant_roll)
        self.register_buffer("lorapt_roll", circulant_roll(self.slices, n3), persistent=False)

    def delta_slices(self) -> Tensor:
        """(U ∗ S ∗ V)_k for this layer's slices: (s, n1, n2), input × output."""
        Uflat, Vstack = self.group.factors()
        return t_product_slices(Uflat, self.lorapt_roll, Vstack)

    def adapter_output(self, x: Tensor) -> Tensor:
        n1, n2, _ = self.group.shape
        s, lead, tokens = len(self.slices), x.shape[:-1], x.numel() // n1
        Uflat, Vstack = self.group.factors()
        out = apply_t_product_slices(x.reshape(tokens, n1), Uflat.to(x.dtype), self.lorapt_roll, Vstack.to(x.dtype))
        return out.reshape(*lead, s * n2)

    @torch.no_grad()
    def add_slices(self, delta: Tensor, sign: float = 1.0) -> None:
        """Add ``delta`` (s, n1, n2) input × output to the base weight (s·n2, n1)."""
        weight = self.base_layer.weight
        weight.add_(delta.transpose(1, 2).reshape(weight.shape).to(weight.dtype), alpha=sign)

    def merge(self) -> None:
        """Fold U ∗ S ∗ V into the residual weight: the fine-tuned weight, at the cost of the base linear."""
        if not self.merged:
            self.add_slices(self.delta_slices().detach())
            self.merged = True

    def unmerge(self) -> None:
        """Subtract it again: back to the residual (up to float rounding)."""
        if self.merged:
            self.add_slices(self.delta_slices().detach(), -1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"slices={list(self.slices)}, merged={self.merged}"


def apply_lora_pt(model: nn.Module, **options) -> dict:
    """Add LoRA-PT in place (see ``LoRAPTConfig``): base weights become the residual; U, S, V and the decoder train."""
    config = LoRAPTConfig(**options)
    freeze_for_adapter(model, train_out=config.train_out)
    groups = nn.ModuleDict()
    for name, group, targets in tensor_groups(model, config.groups, lambda W: LoRAPTGroup(W, config.rank)):
        groups[name] = group
        principal = group.initial_principal()
        for target in targets:
            parent_path, _, attr = target.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            layer = LoRAPTLinear(getattr(parent, attr), group, target.slices)
            layer.add_slices(principal[..., list(target.slices)].permute(2, 0, 1), -1.0)  # W̃ - P: the frozen residual
            setattr(parent, attr, layer)
    model.lorapt_groups = groups
    model.register_forward_pre_hook(clear_forward_caches)
    return options_dict(config)


@torch.no_grad()
def restore_lora_pt_init(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Rebuild the residual weights from the initial U0, S0, V0 saved in an adapter file (``tensors``, by name).

    residual ← residual + P(own init) − P(file's init); untouched where the factors are bit-identical.
    """
    layers = [m for m in model.modules() if isinstance(m, LoRAPTLinear)]
    for name, group in model.lorapt_groups.items():
        saved = [tensors[f"lorapt_groups.{name}.lorapt_{f}0"].to(group.lorapt_U0.device) for f in "USV"]
        own = [group.lorapt_U0, group.lorapt_S0, group.lorapt_V0]
        if all(torch.equal(a, b) for a, b in zip(saved, own)):
            continue
        diff = group.initial_principal() - t_product(saved[0], t_product(saved[1], saved[2]))
        for layer in layers:
            if layer.group is group:
                layer.add_slices(diff[..., list(layer.slices)].permute(2, 0, 1))
        for buffer, value in zip(own, saved):
            buffer.copy_(value)
