"""The segmentation networks (UNETR, Swin UNETR): construction from config, pretrained-weight loading, checkpoint files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from tcurlora_seg.errors import UserError
from tcurlora_seg.models.checkpoint import load_checkpoint, save_checkpoint
from tcurlora_seg.models.swin_unetr import SWIN_ARCH_KEYS, build_swin_unetr, load_pretrained_swin
from tcurlora_seg.models.unetr import ARCH_KEYS, LoadReport, build_unetr, load_pretrained_unetr

__all__ = ["NETWORKS", "LoadReport", "architecture", "build_network", "build_swin_unetr", "build_unetr", "load_checkpoint",
           "load_pretrained", "save_checkpoint"]

# model.backbone -> (MONAI class, the keys handed to it as they are, builder); a config without the key is a UNETR
# (configs and checkpoints written before Swin UNETR)
NETWORKS = {"unetr": ("monai.networks.nets.UNETR", ARCH_KEYS, build_unetr),
            "swin_unetr": ("monai.networks.nets.SwinUNETR", SWIN_ARCH_KEYS, build_swin_unetr)}


def architecture(cfg_model: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(backbone, MONAI class path, the architecture keys ``cfg_model`` sets): what makes two models the same network."""
    backbone = cfg_model.get("backbone") or "unetr"
    if backbone not in NETWORKS:
        raise UserError(f"model.backbone: {backbone!r} is not one of {', '.join(NETWORKS)}")
    target, keys, _ = NETWORKS[backbone]
    return backbone, target, {k: cfg_model[k] for k in keys if k in cfg_model}


def build_network(cfg_model: Mapping[str, Any], *, img_size: Any = None) -> nn.Module:
    """The network ``cfg_model`` describes (``model.backbone``: unetr, the default, or swin_unetr), untrained."""
    backbone, _, _ = architecture(cfg_model)  # checks model.backbone
    return NETWORKS[backbone][2](cfg_model, img_size=img_size)


def load_pretrained(model: nn.Module, path: str | os.PathLike, **options) -> LoadReport:
    """Load a pretrained checkpoint into ``model`` in place, the loader of its backbone; returns the load report."""
    from tcurlora_seg.adapters.backbones import backbone_of

    if backbone_of(model).name == "swin_unetr":
        return load_pretrained_swin(model, path, **options)
    return load_pretrained_unetr(model, path, **options)
