"""The paper's UNETR: build it from config and load pretrained weights into it.

Config keys (``configs/model/*.yaml``; absent architecture keys take MONAI's defaults):
    in_channels, out_channels   input modalities and classes including background (paper: 1 and 2)
    img_size                    input crop, int or [D, H, W]; must equal ``data.roi_size`` (sliding window)
    patch_size                  16: MONAI's UNETR fixes it, the key only documents and checks it
    feature_size, hidden_size, mlp_dim, num_heads, proj_type ("conv" | "perceptron"), norm_name,
    conv_block, res_block, dropout_rate, qkv_bias
    name, pretrained            not used to build: ``pretrained`` is a checkpoint path for :func:`load_pretrained`

Checkpoints accepted by :func:`load_pretrained` (always ``torch.load(weights_only=True)``):
    ours                ``{"model": state_dict, "config": {...}, ...}`` (see :func:`save_checkpoint`)
    official            ``{"epoch", "state_dict", "optim_dict"}`` of t-CURLoRA / LoRA-PT, maybe ``module.``-prefixed
    plain               a MONAI UNETR ``state_dict``
    adapter folder      ``adapter_config.json`` + ``adapter_model.safetensors`` (a run's ``adapter/``): its base is
                        rebuilt from the config's ``base_model_config`` (with that base's own ``pretrained``), the
                        adapter loaded and merged: fine-tune a fine-tuned model again without exporting it first
MONAI version differences (DESIGN §5) are absorbed: a perceptron patch embedding (old ``pos_embed="perceptron"``) is
converted exactly to a conv one and back; a missing qkv bias becomes zero (the same function); ``norm_cross_attn`` /
``cross_attn`` keys (newer ViT blocks, unused by UNETR) and stray ``cls_token`` / ``classification_head`` are ignored.
Shapes are checked: a mismatch or missing key in the ViT or encoders is an error, a different ``out`` head (class
count) is re-initialised and reported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.networks.nets import UNETR
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.errors import UserError
from tcurlora_seg.models.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["LoadReport", "build_unetr", "load_checkpoint", "load_pretrained_unetr", "save_checkpoint"]

# Keys handed to monai.networks.nets.UNETR as they are.
ARCH_KEYS = (
    "in_channels", "out_channels", "feature_size", "hidden_size", "mlp_dim", "num_heads", "proj_type", "norm_name",
    "conv_block", "res_block", "dropout_rate", "qkv_bias",
)  # fmt: skip
_OTHER_KEYS = ("backbone", "img_size", "patch_size", "name", "pretrained")
_PATCH = 16  # fixed inside MONAI's UNETR

# Frozen by every adapter and needed for the pretrained features: strict by default.
_BACKBONE = ("vit.", "encoder1.", "encoder2.", "encoder3.", "encoder4.")
# Checkpoint keys some MONAI versions write that do not change what a UNETR computes.
_HARMLESS_EXTRA = re.compile(r"(^|\.)cls_token$|^vit\.classification_head\.|\.norm_cross_attn\.|\.cross_attn\.")
# Model keys some checkpoints lack without consequence (cross-attention is unused by UNETR).
_HARMLESS_MISSING = re.compile(r"\.norm_cross_attn\.|\.cross_attn\.")
_QKV_BIAS = re.compile(r"\.attn\.qkv\.bias$")
_EMBED = "vit.patch_embedding.patch_embeddings."  # + "weight"/"bias" (conv) or "1.weight"/"1.bias" (perceptron)
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP and torch.compile wrappers


def _as_dict(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


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
    cfg = _as_dict(cfg_model)
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


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with each tensor."""

    path: str
    source_format: str  # "tcurlora_seg", "official", "state_dict wrapper" or "MONAI state_dict"
    loaded: list[str] = field(default_factory=list)  # model keys set from the checkpoint
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks: left at initialisation
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no use for: ignored
    reinitialised: list[str] = field(default_factory=list)  # model keys whose checkpoint shape differed
    notes: list[str] = field(default_factory=list)  # conversions between MONAI versions
    out_reinitialised: bool = False  # the segmentation head was re-initialised (class count changed)
    checkpoint_config: dict[str, Any] | None = None  # the "config" stored in our checkpoints

    def summary(self) -> str:
        """One paragraph for the log."""
        total = len(self.loaded) + len(self.missing) + len(self.reinitialised)
        parts = [f"Loaded {len(self.loaded)}/{total} model tensors from {self.path} ({self.source_format} format)."]
        if self.missing:
            harmless = sum(bool(_HARMLESS_MISSING.search(k)) for k in self.missing)
            parts.append(
                f"{len(self.missing)} missing from the checkpoint, left at initialisation"
                + (f" ({harmless} unused cross-attention keys of newer MONAI)" if harmless else "")
                + f": {_first(self.missing)}."
            )
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint keys ignored: {_first(self.unexpected)}.")
        if self.reinitialised:
            parts.append(f"{len(self.reinitialised)} re-initialised (shape differs): {_first(self.reinitialised)}.")
        parts.extend(self.notes)
        return " ".join(parts)


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _unwrap(ckpt: dict[str, Any], path: str) -> tuple[Mapping[str, Any], str, dict[str, Any] | None]:
    config = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else None
    if isinstance(ckpt.get("model"), Mapping):
        return ckpt["model"], "tcurlora_seg", config
    if isinstance(ckpt.get("state_dict"), Mapping):
        official = "optim_dict" in ckpt or "epoch" in ckpt
        return ckpt["state_dict"], "official" if official else "state_dict wrapper", config
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, "MONAI state_dict", None
    raise UserError(
        f"checkpoint {path}: no weights found (top-level keys: {_first(sorted(map(str, ckpt)))}); expected a "
        "state_dict or a dict with 'model' or 'state_dict'"
    )


def _merged_adapter_folder(path: str) -> dict[str, torch.Tensor]:
    """An adapter folder as a plain state dict: the base it names rebuilt (UNETR or Swin UNETR), the adapter loaded,
    ΔW merged."""
    from tcurlora_seg.adapters import load_adapter, merged_state_dict
    from tcurlora_seg.adapters.files import ADAPTER_CONFIG, read_adapter_config

    try:  # the config names the base; the tensors are read once, by load_adapter
        config = read_adapter_config(path)
    except ValueError as err:
        raise UserError(f"model.pretrained={path}: {err}") from err
    base = dict(config.get("base_model_config") or {})
    if not base:
        raise UserError(f"model.pretrained={path}: its {ADAPTER_CONFIG} names no base model (base_model_config); load it "
                        "with load_adapter onto its base, or export the merged model with export_model=")
    from tcurlora_seg.models import build_network, load_pretrained  # either backbone

    img_size, seed = base.pop("img_size", None), base.pop("seed", None)
    if seed is not None:  # whatever the base's pretrained file does not hold, initialised as in the run
        torch.manual_seed(int(seed))
    model = build_network(base, img_size=img_size)
    if base.get("pretrained"):
        load_pretrained(model, base["pretrained"])
    try:
        load_adapter(model, path)
    except ValueError as err:  # e.g. the base's file changed since: another fingerprint
        raise UserError(f"model.pretrained={path}: {err}") from err
    return merged_state_dict(model)


def _read_state(path: str) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The tensors of a checkpoint file or adapter folder (wrappers and ``module.`` prefixes removed) and a report
    naming its format and stored config: the part every backbone's loader shares."""
    from tcurlora_seg.adapters.files import is_adapter_folder

    if is_adapter_folder(path):
        state, source_format, config = _merged_adapter_folder(path), "adapter folder", None
    else:
        state, source_format, config = _unwrap(load_checkpoint(path), path)
    return _strip_prefixes(state), LoadReport(path=path, source_format=source_format, checkpoint_config=config)


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _convert_patch_embedding(state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str | None:
    """Rewrite a perceptron patch embedding as a conv one or back, in place; return a note or None.

    The perceptron flattens each patch as (p1 p2 p3 c) (einops pattern in MONAI's PatchEmbeddingBlock) before its
    Linear; the conv with kernel = stride = patch computes the same dot products, so the conversion is exact.
    """
    conv_w, mlp_w = _EMBED + "weight", _EMBED + "1.weight"
    if mlp_w in state and conv_w in target and mlp_w not in target:
        hidden, c, *patch = target[conv_w].shape
        if state[mlp_w].numel() != target[conv_w].numel():
            return None  # left for the shape check to report
        # (hidden, p1*p2*p3*c) -> (hidden, c, p1, p2, p3)
        state[conv_w] = state.pop(mlp_w).reshape(hidden, *patch, c).permute(0, 4, 1, 2, 3).contiguous()
        if _EMBED + "1.bias" in state:
            state[_EMBED + "bias"] = state.pop(_EMBED + "1.bias")
        return "Patch embedding converted from perceptron (old MONAI pos_embed) to conv: exact, same outputs."
    if conv_w in state and mlp_w in target and conv_w not in target:
        hidden = state[conv_w].shape[0]
        if state[conv_w].numel() != target[mlp_w].numel():
            return None
        # (hidden, c, p1, p2, p3) -> (hidden, p1*p2*p3*c)
        state[mlp_w] = state.pop(conv_w).permute(0, 2, 3, 4, 1).reshape(hidden, -1)
        if _EMBED + "bias" in state:
            state[_EMBED + "1.bias"] = state.pop(_EMBED + "bias")
        return "Patch embedding converted from conv to perceptron: exact, same outputs."
    return None


def _architecture(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None) -> str:
    """Describe the checkpoint's architecture for error messages, from its config or from tensor shapes."""
    if config is not None:
        cfg = config.get("model", config)
        if isinstance(cfg, Mapping):
            keys = ("img_size", "hidden_size", "mlp_dim", "num_heads", "feature_size", "proj_type")
            found = {k: cfg[k] for k in keys if k in cfg}
            if found:
                return ", ".join(f"{k}={v}" for k, v in found.items())
    found = {}
    pos = state.get("vit.patch_embedding.position_embeddings")
    if pos is not None and pos.ndim == 3:
        found["hidden_size"] = pos.shape[-1]
        side = round(pos.shape[1] ** (1 / 3))
        found["img_size"] = side * _PATCH if side**3 == pos.shape[1] else f"{pos.shape[1]} patches"
    if "vit.blocks.0.mlp.linear1.weight" in state:
        found["mlp_dim"] = state["vit.blocks.0.mlp.linear1.weight"].shape[0]
    if "encoder1.layer.conv1.conv.weight" in state:
        found["feature_size"], found["in_channels"] = state["encoder1.layer.conv1.conv.weight"].shape[:2]
    return ", ".join(f"{k}={v}" for k, v in found.items()) or "unknown"


def _reset(model: torch.nn.Module, keys: list[str]) -> None:
    for name in sorted({k.rsplit(".", 1)[0] for k in keys}):
        module = model.get_submodule(name)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def load_pretrained_unetr(model: UNETR, path: str | os.PathLike, *, strict_vit: bool = True) -> LoadReport:
    """Load pretrained weights into ``model`` (in place) and report what happened.

    Args:
        model: a UNETR from :func:`build_unetr` (before any adapter is applied).
        path: checkpoint file in one of the formats of the module docstring.
        strict_vit: refuse a checkpoint whose ViT/encoder tensors are missing, extra or shaped differently. With False
            those layers keep their initialisation and are listed in the report instead.

    Raises:
        UserError: unreadable file, no matching keys, or (strict_vit) a backbone that does not fit the model.
    """
    path = os.fspath(path)
    state, report = _read_state(path)
    config = report.checkpoint_config
    target = model.state_dict()
    note = _convert_patch_embedding(state, target)
    if note:
        report.notes.append(note)

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
        if key.startswith(_BACKBONE) and strict_vit and not _HARMLESS_MISSING.search(key):
            mismatched.append(f"{key} (missing)")
        report.missing.append(key)

    # Head count leaves no trace in tensor shapes; only our checkpoints' config can tell.
    saved = config.get("model", config) if config is not None else None
    heads = model.vit.blocks[0].attn.num_heads
    if isinstance(saved, Mapping) and saved.get("num_heads") not in (None, heads) and strict_vit:
        mismatched.append(f"num_heads (checkpoint {saved['num_heads']}, model {heads})")
    if zeroed_bias:
        report.notes.append("qkv biases absent from the checkpoint were set to zero (the same function).")
    if not any(key in state for key in target):
        raise UserError(
            f"checkpoint {path}: none of its {len(state)} tensors matches a UNETR key "
            f"(e.g. {_first(sorted(state), 2)}); it is not a MONAI UNETR checkpoint"
        )
    if mismatched and strict_vit:
        raise UserError(
            f"checkpoint {path}: {len(mismatched)} ViT/encoder tensors do not fit the model: {_first(mismatched)}; "
            f"the checkpoint has {_architecture(state, config)}: model.hidden_size/img_size/mlp_dim/num_heads/"
            "feature_size/proj_type/qkv_bias must match the checkpoint (and data.roi_size = model.img_size)"
        )

    return _apply_load(model, report, state, to_load)


def _apply_load(model: torch.nn.Module, report: LoadReport, state: Mapping[str, torch.Tensor],
                to_load: dict[str, torch.Tensor]) -> LoadReport:
    """Load ``to_load`` (non-strict), re-initialise what ``report`` lists as reshaped, note a new class count."""
    target = model.state_dict()
    model.load_state_dict(to_load, strict=False)
    report.loaded = [k for k in target if k in to_load]
    _reset(model, report.reinitialised)
    report.out_reinitialised = any(k.startswith("out.") for k in report.reinitialised)
    head = "out.conv.conv.weight"  # the same head in UNETR and Swin UNETR
    if report.out_reinitialised and head in state and head in target:
        report.notes.append(
            f"Output head re-initialised for training: the checkpoint has {state[head].shape[0]} classes, "
            f"the model {target[head].shape[0]}."
        )
    return report
