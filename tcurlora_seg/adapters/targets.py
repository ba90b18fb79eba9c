"""Where the stacked weight tensors of tCURLoRA (and LoRA-PT) come from in a UNETR or Swin UNETR: the slice mapping.

The one tested place that says which ``nn.Linear`` (and which chunk of MONAI's fused ``attn.qkv``) is slice k of each
tensor group (DESIGN.md §1.4). Slices are in the paper's orientation, input × output (``y = x W``), i.e. ``weight.T``.

Slice order inside the attention tensor is q, k, v, o per layer (slice 4L + 0..3), the paper's order of symbols;
the official code uses o, q, k, v. The order changes which slices the FFT along the stack mixes; it is fixed here.
Swin UNETR's stages differ in width: each stage has its own three tensors (attention n3 = 4 × depth, MLP n3 = depth).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbones import backbone_of, block_paths

__all__ = ["GROUPS", "SliceTarget", "group_targets", "stack_group", "tensor_groups"]

# group name -> (linear inside a transformer block by UNETR's name, number of equal output chunks = slices per linear)
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


def group_targets(model: nn.Module, group: str) -> dict[str, list[SliceTarget]]:
    """The linears of ``group`` in slice order, one tensor per stage of the transformer: ``{tensor name: targets}``
    (UNETR: ``{"attn": [...]}``; Swin UNETR: ``{"attn_layers1": [...], ..., "attn_layers4": [...]}``, see
    ``backbones.Backbone.stage_key``). Raises ValueError for an unknown group or backbone."""
    if group not in GROUPS:
        raise ValueError(f"unknown tensor group '{group}'; choose from {sorted(GROUPS)}")
    backbone = backbone_of(model)
    per_block = GROUPS[group]
    per_layer = sum(chunks for _, chunks in per_block)
    tensors = {}
    for stage, blocks in block_paths(model):
        targets = []
        for layer, block in enumerate(blocks):
            first = layer * per_layer
            for name, chunks in per_block:
                path = f"{block}.{backbone.linear(name)}"
                linear = model.get_submodule(path)
                base = getattr(linear, "base_layer", linear)  # already wrapped by an adapter
                if not isinstance(base, nn.Linear):
                    raise ValueError(f"{path} is {type(base).__name__}, not nn.Linear: build the model with MONAI's "
                                     "fused qkv (the default)")
                targets.append(SliceTarget(path, tuple(range(first, first + chunks))))
                first += chunks
        tensors[backbone.stage_key(group, stage)] = targets
    return tensors


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


def tensor_groups(model: nn.Module, groups: Sequence[str], make: Callable[[Tensor], nn.Module]
                  ) -> list[tuple[str, nn.Module, list[SliceTarget]]]:
    """(tensor name, ``make(W̃)``, its targets) for every stacked tensor of ``groups``, stage by stage.

    A ValueError of ``make`` (a rank above a stage's width) names the tensor and its first linear.
    """
    built = []
    for group in groups:
        for name, targets in group_targets(model, group).items():
            try:
                built.append((name, make(stack_group(model, targets)), targets))
            except ValueError as err:
                raise ValueError(f"tensor {name} ({targets[0].path}, ...): {err}") from None
    return built
