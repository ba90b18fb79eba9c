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
    name, pretrained            not used to build: ``pretrained`` is a checkpoint path for :func:`load_pretrained_swin`

Checkpoints accepted by :func:`load_pretrained_swin` (``torch.load(weights_only=True)``):
    ours / plain        a MONAI ``SwinUNETR`` state dict, bare or under ``model`` / ``state_dict``, maybe ``module.``-prefixed
    self-supervised     MONAI's pretrained encoder (``model_swinvit.pt``: ``module.layers1.0.blocks...``,
                        ``mlp.fc1`` / ``mlp.fc2``, no ``swinViT.`` prefix, no decoder): the transformer is loaded, the
                        rest initialised and reported
    adapter folder      a run's ``adapter/``, merged onto the base it names (as for UNETR)
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
from tcurlora_seg.models.unetr import LoadReport, _apply_load, _as_dict, _first, _read_state

__all__ = ["SWIN_ARCH_KEYS", "build_swin_unetr", "load_pretrained_swin"]

# Keys handed to monai.networks.nets.SwinUNETR as they are.
SWIN_ARCH_KEYS = (
    "in_channels", "out_channels", "patch_size", "depths", "num_heads", "window_size", "qkv_bias", "mlp_ratio",
    "feature_size", "norm_name", "drop_rate", "attn_drop_rate", "dropout_path_rate", "normalize", "patch_norm",
    "use_checkpoint", "downsample", "use_v2",
)  # fmt: skip
_OTHER_KEYS = ("backbone", "img_size", "name", "pretrained")
_DIVISOR = 32  # patch 2 and four 2× patch mergings
_MIN_SIZE = 64  # the bottleneck needs more than one voxel for instance norm
# Frozen by every adapter and needed for the pretrained features.
_TRANSFORMER = "swinViT."
_ENCODERS = ("encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
# The self-supervised checkpoint's heads (rotation, contrastive, reconstruction): no use in segmentation.
_SSL_HEADS = re.compile(r"^(rotation_head|contrastive_head|convTrans3d|conv)\b")


def build_swin_unetr(cfg_model: Mapping[str, Any] | DictConfig, *, img_size: int | list[int] | None = None) -> SwinUNETR:
    """Build a MONAI SwinUNETR from the ``model`` config group (keys in the module docstring).

    ``img_size``: the data ``roi_size``, checked against ``model.img_size`` when both are set. Returns an untrained
    ``SwinUNETR`` mapping (B, in_channels, D, H, W) to logits (B, out_channels, D, H, W), D, H, W divisible by 32.
    """
    cfg = _as_dict(cfg_model)
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


def load_pretrained_swin(model: SwinUNETR, path: str | os.PathLike) -> LoadReport:
    """Load pretrained weights into a SwinUNETR (in place) and report what happened.

    Strict for the transformer (``swinViT``): a missing, extra or differently shaped tensor there is an error naming
    the keys and what to set. The skip encoders are strict when the file has them (a whole SwinUNETR), and are
    initialised and reported when it has none (the self-supervised encoder). A different ``out`` head (class count)
    is re-initialised and reported; so is any decoder tensor the file lacks.
    """
    path = os.fspath(path)
    state, report = _read_state(path)
    config = report.checkpoint_config
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
                        f"{_first(sorted(state), 2)}); it is not a MONAI SwinUNETR checkpoint"
                        + ("; it holds a UNETR (vit.blocks): use model=unetr" if unetr else ""))
    saved = config.get("model", config) if isinstance(config, Mapping) else None
    ours = model.swinViT.layers1[0].downsample
    if isinstance(saved, Mapping) and saved.get("downsample", "merging") != _merging_name(ours):
        raise UserError(f"checkpoint {path}: trained with model.downsample={saved.get('downsample', 'merging')}, the model "
                        f"uses {_merging_name(ours)}: the patch-merging order differs and would permute its features; "
                        f"set model.downsample={saved.get('downsample', 'merging')}")
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
                        f"{_first(mismatched)}; model.feature_size/depths/num_heads/window_size/use_v2 must match the "
                        f"checkpoint ({_describe(state)})")
    return _apply_load(model, report, state, to_load)


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
