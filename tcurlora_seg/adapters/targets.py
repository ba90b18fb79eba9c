"""Where the stacked weight tensors of tCURLoRA (and LoRA-PT) come from in a MONAI UNETR: the slice mapping.

The one tested place that says which ``nn.Linear`` (and which chunk of MONAI's fused ``attn.qkv``) is slice k of each
tensor group (DESIGN.md §1.4). Slices are in the paper's orientation, input × output (``y = x W``), i.e. ``weight.T``.

Slice order inside the attention tensor is q, k, v, o per layer (slice 4L + 0..3), the paper's order of symbols;
the official code uses o, q, k, v. The order changes which slices the FFT along the stack mixes; it is fixed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["GROUPS", "SliceTarget", "group_targets", "stack_group"]

# group name -> (attribute path inside a ViT block, number of equal output chunks = slices per linear)
GROUPS: dict[str, tuple[tuple[str, int], ...]] = {
    "attn": (("attn.qkv", 3), ("attn.out_proj", 1)),
    "mlp_up": (("mlp.linear1", 1),),
    "mlp_down": (("mlp.linear2", 1),),
}


@dataclass(frozen=True)
class SliceTarget:
    """One wrapped linear and the slice indices (one per output chunk) it owns in its group's tensor."""

    path: str  # module path in the model, e.g. "vit.blocks.3.attn.qkv"
    slices: tuple[int, ...]


def _blocks(model: nn.Module) -> nn.ModuleList:
    vit = getattr(model, "vit", None)
    blocks = getattr(vit, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no `vit.blocks`: tensor adapters need a MONAI UNETR (or a model with a MONAI ViT as `.vit`)")
    return blocks


def group_targets(model: nn.Module, group: str) -> list[SliceTarget]:
    """The linears of ``group`` in slice order. Raises ValueError for an unknown group or a non-UNETR model."""
    if group not in GROUPS:
        raise ValueError(f"unknown tensor group '{group}'; choose from {sorted(GROUPS)}")
    per_block = GROUPS[group]
    per_layer = sum(chunks for _, chunks in per_block)
    targets = []
    for layer, block in enumerate(_blocks(model)):
        first = layer * per_layer
        for attr, chunks in per_block:
            linear = block.get_submodule(attr)
            base = getattr(linear, "base_layer", linear)  # already wrapped by an adapter
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"vit.blocks.{layer}.{attr} is {type(base).__name__}, not nn.Linear: build the UNETR with MONAI's fused qkv (the default)"
                )
            targets.append(SliceTarget(f"vit.blocks.{layer}.{attr}", tuple(range(first, first + chunks))))
            first += chunks
    return targets


@torch.no_grad()
def stack_group(model: nn.Module, targets: list[SliceTarget]) -> Tensor:
    """Stack the frozen weights of ``targets`` into W̃ (n1, n2, n3), slice k = chunk of ``weight.T`` (input × output)."""
    slices = []
    for target in targets:
        linear = model.get_submodule(target.path)
        weight = getattr(linear, "base_layer", linear).weight  # (out, in)
        slices.extend(chunk.T for chunk in weight.float().chunk(len(target.slices), dim=0))
    shapes = {tuple(s.shape) for s in slices}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack slices of different shapes {sorted(shapes)} into one tensor")
    return torch.stack(slices, dim=-1).contiguous()
