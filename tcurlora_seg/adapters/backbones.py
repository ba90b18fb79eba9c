"""Which parts of a segmentation network the adapters touch: one table per backbone, recognised from the module.

After peft's per-architecture target table (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``): every method asks
``backbone_of(model)`` where the transformer blocks are, what their linears are called and which modules train,
instead of naming UNETR's modules itself. The paper's split (DESIGN.md §1.4), carried over to Swin UNETR:

==================  =====================================  ==============================================
part                UNETR (MONAI ``UNETR``)                Swin UNETR (MONAI ``SwinUNETR``)
==================  =====================================  ==============================================
transformer         ``vit``: frozen, adapters inside       ``swinViT``: frozen, adapters inside
blocks (stages)     ``vit.blocks`` (one stage)             ``swinViT.layers1..4.0.blocks`` (four stages)
linears per block   attn.qkv, attn.out_proj,               attn.qkv, attn.proj, mlp.linear1, mlp.linear2
                    mlp.linear1, mlp.linear2
skip encoders       ``encoder1..4``: frozen                ``encoder1..4``, ``encoder10``: frozen
decoder             ``decoder2..5``: trained               ``decoder1..5``: trained
head                ``out``: trained when the class count changes (``train_out``), both
not adapted         patch embedding                        patch embedding, patch merging (``downsample``)
==================  =====================================  ==============================================

Methods name linears by UNETR's names (``attn.out_proj`` means Swin's ``attn.proj``), so one config serves both.
A tensor method (tCURLoRA, LoRA-PT) stacks one tensor per group and stage: the stages of Swin have different widths.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Backbone", "BACKBONES", "LINEARS", "backbone_of", "block_paths", "linear_paths"]

# The linears of a transformer block every matrix method adapts, by UNETR's names.
LINEARS = ("attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2")


@dataclass(frozen=True)
class Backbone:
    """Where a backbone keeps what the adapters need (module paths inside the model)."""

    name: str
    transformer: str  # trained only under full fine-tuning (or peft.train_extra)
    patch_embedding: str  # the transformer's input projection: never adapted
    stages: tuple[str, ...]  # nn.ModuleList of transformer blocks, one per stage
    linears: tuple[tuple[str, str], ...]  # (UNETR's name, this backbone's path inside a block)
    decoder: tuple[str, ...]  # trained by every method
    encoders: tuple[str, ...]  # the convolutional skip encoders: frozen

    def linear(self, name: str) -> str:
        """The path inside a block of the linear UNETR calls ``name``."""
        return dict(self.linears)[name]

    def stage_key(self, group: str, stage: str) -> str:
        """Name of ``group``'s tensor in ``stage``: the group itself when there is one stage (UNETR's files keep
        their names), else ``<group>_<stage>``, e.g. ``attn_layers1``."""
        return group if len(self.stages) == 1 else f"{group}_{stage.split('.')[1]}"


BACKBONES: dict[str, Backbone] = {
    "unetr": Backbone(
        name="unetr",
        transformer="vit",
        patch_embedding="vit.patch_embedding",
        stages=("vit.blocks",),
        linears=tuple((n, n) for n in LINEARS),
        decoder=("decoder2", "decoder3", "decoder4", "decoder5"),
        encoders=("encoder1", "encoder2", "encoder3", "encoder4"),
    ),
    "swin_unetr": Backbone(
        name="swin_unetr",
        transformer="swinViT",
        patch_embedding="swinViT.patch_embed",
        stages=tuple(f"swinViT.layers{i}.0.blocks" for i in range(1, 5)),
        linears=(("attn.qkv", "attn.qkv"), ("attn.out_proj", "attn.proj"), ("mlp.linear1", "mlp.linear1"),
                 ("mlp.linear2", "mlp.linear2")),
        decoder=("decoder1", "decoder2", "decoder3", "decoder4", "decoder5"),
        encoders=("encoder1", "encoder2", "encoder3", "encoder4", "encoder10"),
    ),
}


def _module_list(model: nn.Module, path: str) -> nn.ModuleList | None:
    try:
        found = model.get_submodule(path)
    except AttributeError:
        return None
    return found if isinstance(found, nn.ModuleList) and len(found) > 0 else None


def backbone_of(model: nn.Module) -> Backbone:
    """The table entry of ``model`` (a MONAI UNETR or SwinUNETR, or any model laid out like one)."""
    for backbone in BACKBONES.values():
        if all(_module_list(model, stage) is not None for stage in backbone.stages):
            return backbone
    raise ValueError(f"{type(model).__name__} has neither `vit.blocks` (MONAI UNETR) nor `swinViT.layers1..4` (MONAI "
                     "SwinUNETR): adapters need one of these backbones")


def block_paths(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(stage path, [path of each block]) for every stage of ``model``'s transformer."""
    backbone = backbone_of(model)
    return [(stage, [f"{stage}.{i}" for i in range(len(_module_list(model, stage)))]) for stage in backbone.stages]


def linear_paths(model: nn.Module, names: tuple[str, ...] = LINEARS) -> list[str]:
    """Module paths of the linears ``names`` (UNETR's names) in every transformer block, block by block."""
    backbone = backbone_of(model)
    return [f"{block}.{backbone.linear(name)}" for _, blocks in block_paths(model) for block in blocks for name in names]
