"""The paper's UNETR: build it from config and load pretrained weights into it.

Config keys (``configs/model/*.yaml``; absent architecture keys take MONAI's defaults):
    in_channels, out_channels   input modalities and classes including background (paper: 1 and 2)
    img_size                    input crop, int or [D, H, W]; must equal ``data.roi_size`` (sliding window)
    patch_size                  16: MONAI's UNETR fixes it, the key only documents and checks it
    feature_size, hidden_size, mlp_dim, num_heads, proj_type ("conv" | "perceptron"), norm_name,
    conv_block, res_block, dropout_rate, qkv_bias
    name, pretrained            not used to build: ``pretrained`` is a checkpoint file, adapter folder or MONAI Bundle
                                for :func:`load_pretrained_unetr` (formats: ``models/loading.py``)
    pretrained_channels         a source channel per model input channel (BraTS [t1, t1ce, t2, flair] into a T1ce
                                model: [1]) or ``mean``, for a checkpoint that reads another number of channels

What this module adapts when the source differs from the model (each written in the load report): another
``img_size`` (position embeddings resampled trilinearly over the 16³-patch grid; equal sizes stay bit-exact), another
channel count (``pretrained_channels``, on the patch embedding and encoder1's convolutions), a perceptron patch
embedding (old ``pos_embed="perceptron"``, converted exactly to conv and back), a missing qkv bias (zero: the same
function), another class count (the ``out`` head re-initialised); ``norm_cross_attn`` / ``cross_attn`` keys (newer ViT
blocks, unused by UNETR) and stray ``cls_token`` / ``classification_head`` are ignored. Another hidden size, depth, MLP
width, head count or patch size is an error naming what to set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import UNETR
from omegaconf import DictConfig

from tcurlora_seg.errors import UserError
from tcurlora_seg.models.checkpoint import load_checkpoint, save_checkpoint
from tcurlora_seg.models.loading import (
    HARMLESS_MISSING, LoadReport, adapt_input_channels, apply_load, as_dict, check_network, cube_side, first, grid_text,
    prod, read_state, resample_grid, saved_model_config,
)

__all__ = ["LoadReport", "build_unetr", "load_checkpoint", "load_pretrained_unetr", "save_checkpoint"]

# Keys handed to monai.networks.nets.UNETR as they are.
ARCH_KEYS = (
    "in_channels", "out_channels", "feature_size", "hidden_size", "mlp_dim", "num_heads", "proj_type", "norm_name",
    "conv_block", "res_block", "dropout_rate", "qkv_bias",
)  # fmt: skip
_OTHER_KEYS = ("backbone", "img_size", "patch_size", "name", "pretrained", "pretrained_channels")
_PATCH = 16  # fixed inside MONAI's UNETR

# Frozen by every adapter and needed for the pretrained features: strict by default.
_BACKBONE = ("vit.", "encoder1.", "encoder2.", "encoder3.", "encoder4.")
# Checkpoint keys some MONAI versions write that do not change what a UNETR computes.
_HARMLESS_EXTRA = re.compile(r"(^|\.)cls_token$|^vit\.classification_head\.|\.norm_cross_attn\.|\.cross_attn\.")
_QKV_BIAS = re.compile(r"\.attn\.qkv\.bias$")
_EMBED = "vit.patch_embedding.patch_embeddings."  # + "weight"/"bias" (conv) or "1.weight"/"1.bias" (perceptron)


def _img_size(value: Any, key: str) -> tuple[int, int, int]:
    size = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise UserError(f"{key}: expected an int or three ints, got {value!r}")
    if any(s % _PATCH for s in size):
        nearest = [max(_PATCH, round(s / _PATCH) * _PATCH) for s in size]
        raise UserError(f"{key}: {list(size)} must be a multiple of the UNETR patch size {_PATCH} on every axis, e.g. {key}={nearest}")
    return size  # type: ignore[return-value]


def build_unetr(cfg_model: Mapping[str, Any] | DictConfig, *, img_size: int | list[int] | None = None) -> UNETR:
    """Build a MONAI UNETR from the ``model`` config group.

    Args:
        cfg_model: the model config (dict or DictConfig) with the keys listed in the module docstring.
        img_size: the data ``roi_size``; used when ``model.img_size`` is absent or null, checked against it otherwise
            (the sliding-window ROI must equal the ViT input size).

    Returns:
        an untrained ``UNETR`` mapping (B, in_channels, *img_size) to logits (B, out_channels, *img_size).
    """
    cfg = as_dict(cfg_model)
    if "pos_embed" in cfg:
        raise UserError("model.pos_embed: old MONAI name; rename it to model.proj_type (conv or perceptron)")
    unknown = sorted(k for k in cfg if k not in ARCH_KEYS + _OTHER_KEYS and not str(k).startswith("_"))
    if unknown:
        raise UserError(f"model.{unknown[0]}: unknown key; known keys are {', '.join(ARCH_KEYS + _OTHER_KEYS)}")
    if cfg.get("backbone") not in (None, "unetr"):
        raise UserError(f"model.backbone: {cfg['backbone']!r} is not a UNETR; build it with tcurlora_seg.models.build_network")
    for key in ("in_channels", "out_channels"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise UserError(f"model.{key}: expected a positive int, got {cfg.get(key)!r}")
    if cfg.get("patch_size", _PATCH) not in (_PATCH, [_PATCH] * 3):
        raise UserError(f"model.patch_size: MONAI's UNETR uses patches of {_PATCH}; set model.patch_size: {_PATCH}")

    if cfg.get("img_size") is None and img_size is None:
        raise UserError("model.img_size: not set; set it to data.roi_size")
    roi = _img_size(img_size, "data.roi_size") if img_size is not None else None  # first: the key a user sets
    size = _img_size(cfg["img_size"] if cfg.get("img_size") is not None else img_size, "model.img_size")
    if roi is not None and roi != size:
        raise UserError(
            f"model.img_size {list(size)} differs from data.roi_size {list(roi)}; "
            "the sliding-window ROI must equal the UNETR input: set both to the same size"
        )

    kwargs = {k: cfg[k] for k in ARCH_KEYS if cfg.get(k) is not None}
    if isinstance(kwargs.get("norm_name"), list):  # YAML has no tuples: ["instance", {"affine": true}]
        kwargs["norm_name"] = tuple(kwargs["norm_name"])
    if kwargs.get("proj_type", "conv") not in ("conv", "perceptron"):
        raise UserError(f"model.proj_type: {kwargs['proj_type']!r} is not conv or perceptron")
    hidden, heads = kwargs.get("hidden_size", 768), kwargs.get("num_heads", 12)
    if hidden % heads:
        raise UserError(f"model.hidden_size {hidden} must be a multiple of model.num_heads {heads}")
    return UNETR(img_size=size, **kwargs)


# The tensors that read the image (conv layout (out, in, *kernel)): model.pretrained_channels applies to them.
_CONV_W, _MLP_W = _EMBED + "weight", _EMBED + "1.weight"
_IMAGE_READERS = (_CONV_W, "encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight")
_POSITIONS = "vit.patch_embedding.position_embeddings"  # (1, n_patches, hidden), patches in row-major grid order
# A Bundle's network_def: the names of this class, what differs and is adapted, what holds no tensor.
_BUNDLE_CLASSES = ("UNETR", "monai.networks.nets.UNETR", "monai.networks.nets.unetr.UNETR")
_ADAPTED = {"img_size": "position embeddings resampled", "in_channels": "by model.pretrained_channels",
            "out_channels": "head re-initialised", "proj_type": "patch embedding converted exactly"}
_NO_WEIGHTS = ("dropout_rate",)


def describe_unetr(model: UNETR) -> dict[str, Any]:
    """The architecture keys of a built UNETR, read from its modules (what a Bundle's network_def is checked against)."""
    conv, attn = model.encoder1.layer.conv1.conv, model.vit.blocks[0].attn
    return {"in_channels": conv.in_channels, "out_channels": model.out.conv.conv.out_channels,
            "img_size": [int(g) * _PATCH for g in model.feat_size], "feature_size": conv.out_channels,
            "hidden_size": model.hidden_size, "mlp_dim": model.vit.blocks[0].mlp.linear1.out_features,
            "num_heads": attn.num_heads, "proj_type": model.vit.patch_embedding.proj_type,
            "qkv_bias": attn.qkv.bias is not None, "dropout_rate": model.vit.blocks[0].mlp.drop1.p}


def _to_conv(state: dict[str, torch.Tensor]) -> bool:
    """Rewrite a perceptron patch embedding (old MONAI ``pos_embed="perceptron"``) in conv layout, in place; True if
    it was one. The perceptron flattens each patch as (p1 p2 p3 c) (einops pattern in MONAI's PatchEmbeddingBlock)
    before its Linear; a conv with kernel = stride = patch computes the same dot products, so this is exact."""
    weight = state.get(_MLP_W)
    if weight is None or weight.ndim != 2 or weight.shape[1] % _PATCH**3:
        return False  # none, or not a 16³ patch: left for the shape check to report
    hidden, channels = weight.shape[0], weight.shape[1] // _PATCH**3
    # (hidden, p1*p2*p3*c) -> (hidden, c, p1, p2, p3)
    state[_CONV_W] = state.pop(_MLP_W).reshape(hidden, _PATCH, _PATCH, _PATCH, channels).permute(0, 4, 1, 2, 3).contiguous()
    if _EMBED + "1.bias" in state:
        state[_EMBED + "bias"] = state.pop(_EMBED + "1.bias")
    return True


def _to_perceptron(state: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`_to_conv`, for a model with a perceptron patch embedding."""
    if _CONV_W in state:
        weight = state.pop(_CONV_W)  # (hidden, c, p1, p2, p3) -> (hidden, p1*p2*p3*c)
        state[_MLP_W] = weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)
        if _EMBED + "bias" in state:
            state[_EMBED + "1.bias"] = state.pop(_EMBED + "bias")


def _source_grid(n: int, saved: Mapping[str, Any] | None, path: str) -> list[int]:
    """The checkpoint's patch grid: from its recorded img_size, else the cube that holds n patches."""
    size = saved.get("img_size") if saved else None
    if size is not None:
        grid = [int(s) // _PATCH for s in ([size] * 3 if isinstance(size, int) else size)]
        if prod(grid) == n:
            return grid
    side = cube_side(n)
    if side is None:
        raise UserError(f"checkpoint {path}: its {n} position embeddings are no cube of patches and it records no "
                        "img_size, so their grid is unknown; re-save it as {'model': state_dict, 'config': {'model': "
                        "{'img_size': [D, H, W]}}} with its training size")
    return [side] * 3


def _resample_positions(state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], dst: list[int],
                        saved: Mapping[str, Any] | None, path: str) -> str | None:
    """Position embeddings of another patch grid resampled to the model's (``dst``), in place; a note, or None."""
    pos, own = state.get(_POSITIONS), target.get(_POSITIONS)
    if pos is None or own is None or pos.shape == own.shape or pos.ndim != 3 or pos.shape[-1] != own.shape[-1]:
        return None  # equal (bit-exact), absent, or another hidden size: the shape check decides
    src = _source_grid(pos.shape[1], saved, path)
    state[_POSITIONS] = resample_grid(pos[0], src, dst).unsqueeze(0)
    return (f"Position embeddings resampled from a {grid_text(src)} to a {grid_text(dst)} patch grid (img_size "
            f"{[g * _PATCH for g in src]} -> {[g * _PATCH for g in dst]}), trilinear.")


def _architecture(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None) -> str:
    """Describe the checkpoint's architecture for error messages, from its config or from tensor shapes."""
    if config is not None:
        keys = ("img_size", "hidden_size", "mlp_dim", "num_heads", "feature_size", "proj_type")
        found = {k: config[k] for k in keys if k in config}
        if found:
            return ", ".join(f"{k}={v}" for k, v in found.items())
    found = {}
    pos = state.get(_POSITIONS)
    if pos is not None and pos.ndim == 3:
        found["hidden_size"] = pos.shape[-1]
        side = cube_side(pos.shape[1])
        found["img_size"] = side * _PATCH if side else f"{pos.shape[1]} patches"
    if _CONV_W in state and state[_CONV_W].ndim == 5:
        found["patch_size"] = list(state[_CONV_W].shape[2:])
    blocks = {k.split(".")[2] for k in state if k.startswith("vit.blocks.")}
    if blocks:
        found["depth"] = len(blocks)
    if "vit.blocks.0.mlp.linear1.weight" in state:
        found["mlp_dim"] = state["vit.blocks.0.mlp.linear1.weight"].shape[0]
    if "encoder1.layer.conv1.conv.weight" in state:
        found["feature_size"], found["in_channels"] = state["encoder1.layer.conv1.conv.weight"].shape[:2]
    return ", ".join(f"{k}={v}" for k, v in found.items()) or "unknown"


def load_pretrained_unetr(model: UNETR, path: str | os.PathLike, *, strict_vit: bool = True,
                          channels: list[int] | str | None = None) -> LoadReport:
    """Load pretrained weights into ``model`` (in place) and report what happened.

    Args:
        model: a UNETR from :func:`build_unetr` (before any adapter is applied).
        path: a checkpoint file, adapter folder or MONAI Bundle (``models.loading``).
        strict_vit: refuse a checkpoint whose ViT/encoder tensors are missing, extra or shaped differently (after the
            adaptations below). With False those layers keep their initialisation and are listed in the report instead.
        channels: ``model.pretrained_channels``: a source channel per model input channel, or ``"mean"``; needed when
            the checkpoint reads another number of image channels than the model.

    Adapted and reported: another ``img_size`` (position embeddings resampled over the patch grid), another channel
    count (``channels``), a perceptron / conv patch embedding (converted exactly), absent qkv biases (zero), another
    class count (head re-initialised). Refused: another hidden size, depth, MLP width, head count or patch size.

    Raises:
        UserError: unreadable file, no matching keys, or (strict_vit) a backbone that does not fit the model.
    """
    path = os.fspath(path)
    state, report = read_state(path)
    saved = saved_model_config(report)
    check_network(report, _BUNDLE_CLASSES, describe_unetr(model), adaptable=_ADAPTED, harmless=_NO_WEIGHTS,
                  backbone="model=unetr")
    target = model.state_dict()
    was_perceptron = _to_conv(state)
    notes = [adapt_input_channels(state, _IMAGE_READERS, model.encoder1.layer.conv1.conv.in_channels, channels, path)]
    if _MLP_W in target:
        _to_perceptron(state)
    if was_perceptron != (_MLP_W in target):
        notes.append("Patch embedding converted from perceptron (old MONAI pos_embed) to conv: exact, same outputs."
                     if was_perceptron else "Patch embedding converted from conv to perceptron: exact, same outputs.")
    notes.append(_resample_positions(state, target, [int(g) for g in model.feat_size], saved, path))
    report.notes.extend(n for n in notes if n)

    to_load: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    zeroed_bias = False
    for key, value in state.items():
        if key not in target:
            # A non-zero qkv bias changes the function: only a zero one is as good as none.
            harmless = _HARMLESS_EXTRA.search(key) or (_QKV_BIAS.search(key) and not value.any())
            if not harmless and key.startswith(_BACKBONE) and strict_vit:
                mismatched.append(f"{key} (not in the model)")
            report.unexpected.append(key)
        elif value.shape != target[key].shape:
            if key.startswith(_BACKBONE):
                mismatched.append(f"{key} (checkpoint {tuple(value.shape)}, model {tuple(target[key].shape)})")
            report.reinitialised.append(key)
        else:
            to_load[key] = value
    for key in target:
        if key in state:
            continue
        if _QKV_BIAS.search(key):  # old UNETR has no qkv bias: zero is the same function
            to_load[key] = torch.zeros_like(target[key])
            zeroed_bias = True
            continue
        if key.startswith(_BACKBONE) and strict_vit and not HARMLESS_MISSING.search(key):
            mismatched.append(f"{key} (missing)")
        report.missing.append(key)

    # Head count leaves no trace in tensor shapes; only a recorded config (ours, a Bundle's) can tell.
    heads = model.vit.blocks[0].attn.num_heads
    if saved is not None and saved.get("num_heads") not in (None, heads) and strict_vit:
        mismatched.append(f"num_heads (checkpoint {saved['num_heads']}, model {heads})")
    if zeroed_bias:
        report.notes.append("qkv biases absent from the checkpoint were set to zero (the same function).")
    if not any(key in state for key in target):
        raise UserError(
            f"checkpoint {path}: none of its {len(state)} tensors matches a UNETR key "
            f"(e.g. {first(sorted(state), 2)}); it is not a MONAI UNETR checkpoint"
        )
    if mismatched and strict_vit:
        raise UserError(
            f"checkpoint {path}: {len(mismatched)} ViT/encoder tensors do not fit the model: {first(mismatched)}; "
            f"the checkpoint has {_architecture(state, saved)}: model.hidden_size/mlp_dim/num_heads/feature_size/"
            "qkv_bias and the depth (12 blocks) and patch size (16) must match it (img_size, in_channels and proj_type "
            "are adapted)"
        )

    return apply_load(model, report, state, to_load)
