"""MONAI's Swin UNETR: build it from config and load pretrained weights into it.

Config keys (``configs/model/swin_unetr*.yaml``; absent architecture keys take MONAI's defaults):
    backbone                    ``swin_unetr`` (selects this module; UNETR configs say ``unetr`` or nothing)
    in_channels, out_channels   input modalities and classes including background
    img_size                    the sliding-window ROI, int or [D, H, W]; must equal ``data.roi_size``. Swin UNETR itself
                                takes any input divisible by 32 (MONAI ≥ 1.5 dropped its ``img_size`` argument); at least
                                64 per axis, since at 32 the bottleneck holds one voxel and instance norm cannot train
    feature_size                a multiple of 12 (48: the pretrained models'); stage widths are 1, 2, 4, 8 × it
    depths, num_heads           blocks and heads per stage (2-2-2-2, 3-6-12-24)
    window_size, patch_size, qkv_bias, mlp_ratio, norm_name, drop_rate, attn_drop_rate, dropout_path_rate, normalize,
    patch_norm, use_checkpoint, downsample, use_v2
    name, pretrained            not used to build: ``pretrained`` is a checkpoint path, adapter folder or MONAI Bundle
                                for :func:`load_pretrained_swin`
    pretrained_channels         a source channel per model input channel, or ``mean`` (as for UNETR)

Checkpoints accepted by :func:`load_pretrained_swin` (``torch.load(weights_only=True)``):
    ours / plain        a MONAI ``SwinUNETR`` state dict, bare or under ``model`` / ``state_dict``, maybe ``module.``-prefixed
    self-supervised     MONAI's pretrained encoder (``model_swinvit.pt``: ``module.layers1.0.blocks...``,
                        ``mlp.fc1`` / ``mlp.fc2``, no ``swinViT.`` prefix, no decoder): the transformer is loaded, the
                        rest initialised and reported
    adapter folder      a run's ``adapter/``, merged onto the base it names (as for UNETR)
    MONAI Bundle        ``configs/inference.json`` + ``models/model.pt`` (MONAI's model zoo, ``make export``)
Adapted and reported: another window size (relative-position bias tables resampled over the (2w-1)³ offsets, as
Swin V1 fine-tuning at another window does; equal windows stay bit-exact), another channel count
(``pretrained_channels``), another class count (head re-initialised).
Traps between MONAI versions: ``downsample="merging"`` (the v0.9 order that MONAI's pretrained weights use) and
``"mergingv2"`` sample the 2×2×2 neighbours in a different order, so a ``reduction`` weight trained with one silently
permutes features under the other: our checkpoints record ``downsample`` and a mismatch is refused; other files
cannot tell, so keep the default unless the file's documentation says otherwise. ``use_v2`` checkpoints carry extra
residual conv blocks (``layers1c``...): refused unless ``use_v2`` is set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import SwinUNETR
from omegaconf import DictConfig

from tcurlora_seg.errors import UserError
from tcurlora_seg.models.loading import (
    LoadReport, adapt_input_channels, apply_load, as_dict, check_network, cube_side, first, grid_text, read_state,
    resample_grid, saved_model_config,
)

__all__ = ["SWIN_ARCH_KEYS", "build_swin_unetr", "load_pretrained_swin"]

# Keys handed to monai.networks.nets.SwinUNETR as they are.
SWIN_ARCH_KEYS = (
    "in_channels", "out_channels", "patch_size", "depths", "num_heads", "window_size", "qkv_bias", "mlp_ratio",
    "feature_size", "norm_name", "drop_rate", "attn_drop_rate", "dropout_path_rate", "normalize", "patch_norm",
    "use_checkpoint", "downsample", "use_v2",
)  # fmt: skip
_OTHER_KEYS = ("backbone", "img_size", "name", "pretrained", "pretrained_channels")
_DIVISOR = 32  # patch 2 and four 2× patch mergings
_MIN_SIZE = 64  # the bottleneck needs more than one voxel for instance norm
# Frozen by every adapter and needed for the pretrained features.
_TRANSFORMER = "swinViT."
_ENCODERS = ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
# The self-supervised checkpoint's heads (rotation, contrastive, reconstruction): no use in segmentation.
_SSL_HEADS = re.compile(r"^(rotation_head|contrastive_head|convTrans3d|conv)\b")
# The tensors that read the image (conv layout): model.pretrained_channels applies to them.
_IMAGE_READERS = (_TRANSFORMER + "patch_embed.proj.weight", "encoder1.layer.conv1.conv.weight",
                  "encoder1.layer.conv3.conv.weight")
# Each block's bias over the (2w-1)³ window offsets, and the index into it, which the model builds for its window.
_BIAS_TABLE = re.compile(r"\.attn\.relative_position_bias_table$")
_BIAS_INDEX = re.compile(r"\.attn\.relative_position_index$")
_BUNDLE_CLASSES = ("SwinUNETR", "monai.networks.nets.SwinUNETR", "monai.networks.nets.swin_unetr.SwinUNETR")
_ADAPTED = {"window_size": "relative-position bias resampled", "in_channels": "by model.pretrained_channels",
            "out_channels": "head re-initialised"}
_NO_WEIGHTS = ("drop_rate", "attn_drop_rate", "dropout_path_rate", "use_checkpoint")


def build_swin_unetr(cfg_model: Mapping[str, Any] | DictConfig, *, img_size: int | list[int] | None = None) -> SwinUNETR:
    """Build a MONAI SwinUNETR from the ``model`` config group (keys in the module docstring).

    ``img_size``: the data ``roi_size``, checked against ``model.img_size`` when both are set. Returns an untrained
    ``SwinUNETR`` mapping (B, in_channels, D, H, W) to logits (B, out_channels, D, H, W), D, H, W divisible by 32.
    """
    cfg = as_dict(cfg_model)
    unknown = sorted(k for k in cfg if k not in SWIN_ARCH_KEYS + _OTHER_KEYS and not str(k).startswith("_"))
    if unknown:
        raise UserError(f"model.{unknown[0]}: unknown key for backbone swin_unetr; known keys are "
                        f"{', '.join(SWIN_ARCH_KEYS + _OTHER_KEYS)}")
    for key in ("in_channels", "out_channels"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise UserError(f"model.{key}: expected a positive int, got {cfg.get(key)!r}")
    feature = cfg.get("feature_size", 24)
    if not isinstance(feature, int) or feature < 12 or feature % 12:
        raise UserError(f"model.feature_size: Swin UNETR needs a multiple of 12 (e.g. 12, 24, 48), got {feature!r}")
    depths, heads = list(cfg.get("depths", (2, 2, 2, 2))), list(cfg.get("num_heads", (3, 6, 12, 24)))
    if len(depths) != 4 or len(heads) != 4:
        raise UserError(f"model.depths {depths} and model.num_heads {heads}: Swin UNETR has four stages; give four each")
    for stage, h in enumerate(heads):
        if (feature << stage) % h:
            raise UserError(f"model.num_heads: stage {stage + 1} is {feature << stage} wide, not a multiple of {h} heads")
    sizes = [_swin_size(v, key) for v, key in ((img_size, "data.roi_size"), (cfg.get("img_size"), "model.img_size"))
             if v is not None]
    if not sizes:
        raise UserError("model.img_size: not set; set it to data.roi_size")
    if len(sizes) == 2 and sizes[0] != sizes[1]:
        raise UserError(f"model.img_size {list(sizes[1])} differs from data.roi_size {list(sizes[0])}; the "
                        "sliding-window ROI is the model's input: set both to the same size")
    kwargs = {k: cfg[k] for k in SWIN_ARCH_KEYS if cfg.get(k) is not None}
    for key in ("depths", "num_heads", "window_size"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if isinstance(kwargs.get("norm_name"), list):  # YAML has no tuples: ["instance", {"affine": true}]
        kwargs["norm_name"] = tuple(kwargs["norm_name"])
    return SwinUNETR(spatial_dims=3, **kwargs)


def _swin_size(value: Any, key: str) -> tuple[int, int, int]:
    size = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
        raise UserError(f"{key}: expected an int or three ints, got {value!r}")
    if any(s % _DIVISOR or s < _MIN_SIZE for s in size):
        nearest = [max(_MIN_SIZE, round(s / _DIVISOR) * _DIVISOR) for s in size]
        raise UserError(f"{key}: {list(size)} must be a multiple of {_DIVISOR} and at least {_MIN_SIZE} on every axis "
                        f"for Swin UNETR (at 32 its bottleneck is one voxel), e.g. {key}={nearest}")
    return size  # type: ignore[return-value]


def _from_self_supervised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """MONAI's self-supervised encoder layout renamed to SwinUNETR's, or None when ``state`` is not in it."""
    if not any(k.startswith(("layers1.0.blocks.", "patch_embed.")) for k in state):
        return None
    renamed = {}
    for key, value in state.items():
        if _SSL_HEADS.match(key) or key.startswith("norm."):
            renamed[key] = value  # left unexpected: reported, not loaded
            continue
        key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        renamed[_TRANSFORMER + key] = value
    return renamed


def describe_swin(model: SwinUNETR) -> dict[str, Any]:
    """The architecture keys of a built SwinUNETR, read from its modules (what a Bundle's network_def is checked against)."""
    vit = model.swinViT
    stages = [getattr(vit, f"layers{i}")[0] for i in range(1, 5)]
    attn = stages[0].blocks[0].attn
    return {"in_channels": vit.patch_embed.proj.in_channels, "out_channels": model.out.conv.conv.out_channels,
            "feature_size": vit.embed_dim, "depths": [len(stage.blocks) for stage in stages],
            "num_heads": [stage.blocks[0].attn.num_heads for stage in stages], "window_size": list(vit.window_size),
            "patch_size": list(vit.patch_size) if isinstance(vit.patch_size, (tuple, list)) else vit.patch_size,
            "qkv_bias": attn.qkv.bias is not None, "use_v2": bool(vit.use_v2),
            "downsample": _merging_name(stages[0].downsample)}


def _window(rows: int, saved: Mapping[str, Any] | None) -> list[int] | None:
    """The window a bias table of ``rows`` offsets was trained for: (2w-1)³ rows, or the recorded window_size."""
    size = saved.get("window_size") if saved else None
    if size is not None:
        window = [int(size)] * 3 if isinstance(size, int) else [int(w) for w in size]
        if len(window) == 3 and _offsets(window) == rows:
            return window
    side = cube_side(rows)
    return [(side + 1) // 2] * 3 if side and side % 2 else None


def _offsets(window: list[int]) -> int:
    return (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)


def _resample_bias(state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], window: list[int],
                   saved: Mapping[str, Any] | None, path: str) -> str | None:
    """Relative-position bias tables of another window size resampled to the model's window, in place (the index
    buffers are the model's own); the report's note, or None when every table fits."""
    tables = [k for k in state if _BIAS_TABLE.search(k) and k in target and state[k].shape != target[k].shape
              and state[k].shape[-1] == target[k].shape[-1]]
    if not tables:
        return None
    src = _window(state[tables[0]].shape[0], saved)
    if src is None:
        raise UserError(f"checkpoint {path}: its relative-position bias tables ({state[tables[0]].shape[0]} rows) fit "
                        f"no cubic window and it records no window_size; set model.window_size to the checkpoint's")
    grid_src, grid_dst = [2 * w - 1 for w in src], [2 * w - 1 for w in window]
    for key in tables:
        state[key] = resample_grid(state[key], grid_src, grid_dst)
    for key in [k for k in state if _BIAS_INDEX.search(k) and k in target]:
        state[key] = target[key]  # a function of the window alone: the model's
    return (f"Relative-position bias of {len(tables)} blocks resampled from window {grid_text(src)} to "
            f"{grid_text(window)} ({grid_text(grid_src)} -> {grid_text(grid_dst)} offsets), trilinear.")


def load_pretrained_swin(model: SwinUNETR, path: str | os.PathLike, *,
                         channels: list[int] | str | None = None) -> LoadReport:
    """Load pretrained weights into a SwinUNETR (in place) and report what happened.

    Strict for the transformer (``swinViT``): a missing, extra or differently shaped tensor there is an error naming
    the keys and what to set. The skip encoders are strict when the file has them (a whole SwinUNETR), and are
    initialised and reported when it has none (the self-supervised encoder). A different ``out`` head (class count)
    is re-initialised and reported; so is any decoder tensor the file lacks. Adapted and reported: another
    ``window_size`` (each block's relative-position bias resampled over the window offsets), another channel count
    (``channels`` = ``model.pretrained_channels``, on ``swinViT.patch_embed`` and encoder1).
    """
    path = os.fspath(path)
    state, report = read_state(path)
    saved = saved_model_config(report)
    check_network(report, _BUNDLE_CLASSES, describe_swin(model), adaptable=_ADAPTED, harmless=_NO_WEIGHTS,
                  backbone="model=swin_unetr")
    renamed = _from_self_supervised(state)
    if renamed is not None:
        state = renamed
        report.source_format = "self-supervised Swin encoder"
        report.notes.append("Self-supervised encoder layout (mlp.fc1/fc2, no decoder): the transformer was loaded; "
                            "encoders and decoder start from initialisation.")
    target = model.state_dict()
    if not any(key.startswith(_TRANSFORMER) and key in target for key in state):
        unetr = any(key.startswith("vit.blocks.") for key in state)
        raise UserError(f"checkpoint {path}: none of its {len(state)} tensors is a SwinUNETR transformer key (e.g. "
                        f"{first(sorted(state), 2)}); it is not a MONAI SwinUNETR checkpoint"
                        + ("; it holds a UNETR (vit.blocks): use model=unetr" if unetr else ""))
    ours = model.swinViT.layers1[0].downsample
    if saved is not None and saved.get("downsample", "merging") != _merging_name(ours):
        raise UserError(f"checkpoint {path}: trained with model.downsample={saved.get('downsample', 'merging')}, the model "
                        f"uses {_merging_name(ours)}: the patch-merging order differs and would permute its features; "
                        f"set model.downsample={saved.get('downsample', 'merging')}")
    notes = [adapt_input_channels(state, _IMAGE_READERS, model.swinViT.patch_embed.proj.in_channels, channels, path),
             _resample_bias(state, target, list(model.swinViT.window_size), saved, path)]
    report.notes.extend(n for n in notes if n)
    has_encoders = any(k.startswith(_ENCODERS) for k in state)
    strict = (_TRANSFORMER, *(_ENCODERS if has_encoders else ()))
    to_load, mismatched = {}, []
    for key, value in state.items():
        if key not in target:
            if key.startswith(strict):
                mismatched.append(f"{key} (not in the model)")
            report.unexpected.append(key)
        elif value.shape != target[key].shape:
            if key.startswith(strict):
                mismatched.append(f"{key} (checkpoint {tuple(value.shape)}, model {tuple(target[key].shape)})")
            report.reinitialised.append(key)
        else:
            to_load[key] = value
    for key in target:
        if key not in state:
            if key.startswith(strict):
                mismatched.append(f"{key} (missing)")
            report.missing.append(key)
    if mismatched:
        raise UserError(f"checkpoint {path}: {len(mismatched)} transformer/encoder tensors do not fit the model: "
                        f"{first(mismatched)}; model.feature_size/depths/num_heads/patch_size/use_v2 must match the "
                        f"checkpoint ({_describe(state)}; window_size and in_channels are adapted)")
    return apply_load(model, report, state, to_load)


def _merging_name(module: torch.nn.Module | None) -> str:
    from monai.networks.nets.swin_unetr import MERGING_MODE

    return next((name for name, cls in MERGING_MODE.items() if type(module) is cls), type(module).__name__)


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    """The checkpoint's feature size and depths, read from tensor shapes, for error messages."""
    embed = state.get(_TRANSFORMER + "patch_embed.proj.weight")
    found = [f"feature_size={embed.shape[0]}"] if embed is not None else []
    depths = [len({k.split(".")[4] for k in state if k.startswith(f"{_TRANSFORMER}layers{i}.0.blocks.")}) for i in range(1, 5)]
    if any(depths):
        found.append(f"depths={depths}")
    return ", ".join(found) or "its shapes are unknown"
