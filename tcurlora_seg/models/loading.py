"""What the UNETR and Swin UNETR loaders share: reading a pretrained source, adapting it to the run's model, the report.

Sources (:func:`read_state`; tensors always through ``torch.load(weights_only=True)`` or safetensors):
    checkpoint file     ours ``{"model", "config", ...}``, the official ``{"epoch", "state_dict", "optim_dict"}``, a
                        ``{"state_dict"}`` wrapper or a bare state dict; ``module.`` / ``_orig_mod.`` prefixes removed
    adapter folder      a run's ``adapter/``: the base its config names rebuilt, the adapter loaded and merged
    MONAI Bundle        a folder with ``configs/inference.json`` (or ``.yaml``) and ``models/model.pt``, as ``make export``
                        writes and MONAI's model zoo ships: its ``network_def`` (references resolved by MONAI's
                        ConfigParser) is checked against the run's model and its weights read as a checkpoint file

Adaptations to another model (each backbone file says which tensors they apply to), each written in the report:
    :func:`resample_grid`        a table laid on a 3-D grid (UNETR's position embeddings over the patch grid, Swin's
                                 relative-position bias over the window offsets) resampled trilinearly to another grid,
                                 as ViT fine-tuning at a new resolution does (timm's ``resample_abs_pos_embed``)
    :func:`adapt_input_channels` the tensors that read the image, from the checkpoint's channels to the model's:
                                 ``model.pretrained_channels`` = a source channel per model channel, or ``mean``
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.errors import UserError
from tcurlora_seg.models.checkpoint import load_checkpoint

__all__ = ["LoadReport", "adapt_input_channels", "apply_load", "check_network", "first", "is_bundle", "read_state",
           "resample_grid"]

_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP and torch.compile wrappers
# Model keys some checkpoints lack without consequence (cross-attention of newer MONAI ViT blocks, unused by UNETR).
HARMLESS_MISSING = re.compile(r"\.norm_cross_attn\.|\.cross_attn\.")
_BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
_BUNDLE_WEIGHTS = Path("models") / "model.pt"


def as_dict(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


@dataclass
class LoadReport:
    """What a loader did with each tensor."""

    path: str
    source_format: str  # "tcurlora_seg", "official", "state_dict wrapper", "MONAI state_dict", "adapter folder", "MONAI Bundle"
    loaded: list[str] = field(default_factory=list)  # model keys set from the checkpoint
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks: left at initialisation
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no use for: ignored
    reinitialised: list[str] = field(default_factory=list)  # model keys whose checkpoint shape differed
    notes: list[str] = field(default_factory=list)  # conversions and adaptations (resampled, channels mapped)
    out_reinitialised: bool = False  # the segmentation head was re-initialised (class count changed)
    checkpoint_config: dict[str, Any] | None = None  # the "config" stored in our checkpoints, or a Bundle's network

    def summary(self) -> str:
        """One paragraph for the log."""
        total = len(self.loaded) + len(self.missing) + len(self.reinitialised)
        parts = [f"Loaded {len(self.loaded)}/{total} model tensors from {self.path} ({self.source_format} format)."]
        if self.missing:
            harmless = sum(bool(HARMLESS_MISSING.search(k)) for k in self.missing)
            parts.append(
                f"{len(self.missing)} missing from the checkpoint, left at initialisation"
                + (f" ({harmless} unused cross-attention keys of newer MONAI)" if harmless else "")
                + f": {first(self.missing)}."
            )
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint keys ignored: {first(self.unexpected)}.")
        if self.reinitialised:
            parts.append(f"{len(self.reinitialised)} re-initialised (shape differs): {first(self.reinitialised)}.")
        parts.extend(self.notes)
        return " ".join(parts)


def first(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# --- reading a source -----------------------------------------------------------------------------------------------

def is_bundle(path: str | os.PathLike) -> bool:
    """A MONAI Bundle folder: ``configs/inference.*`` and ``models/model.pt``."""
    root = Path(path)
    return root.is_dir() and (root / "configs").is_dir() and any((root / "configs" / n).is_file() for n in _BUNDLE_CONFIGS)


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
        f"checkpoint {path}: no weights found (top-level keys: {first(sorted(map(str, ckpt)))}); expected a "
        "state_dict or a dict with 'model' or 'state_dict'"
    )


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


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
        load_pretrained(model, base["pretrained"], channels=base.get("pretrained_channels"))
    try:
        load_adapter(model, path)
    except ValueError as err:  # e.g. the base's file changed since: another fingerprint
        raise UserError(f"model.pretrained={path}: {err}") from err
    return merged_state_dict(model)


def _bundle_network(root: Path) -> dict[str, Any]:
    """The Bundle's ``network_def`` with its references (``@id``, ``$expr``) resolved, not instantiated."""
    from monai.bundle import ConfigParser

    config = next(root / "configs" / n for n in _BUNDLE_CONFIGS if (root / "configs" / n).is_file())
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
    except Exception as err:  # JSON / YAML syntax: MONAI raises several types
        raise UserError(f"bundle {root}: {config} is not a readable bundle config ({type(err).__name__}: {err}); "
                        "re-export the bundle") from err
    if "network_def" not in parser.config:
        raise UserError(f"bundle {root}: {config} has no network_def; a bundle used as model.pretrained must define its "
                        "network there (as MONAI's model zoo and make export do)")
    try:
        network = parser.get_parsed_content("network_def", instantiate=False).get_config()
    except Exception as err:  # an unresolvable reference or expression
        raise UserError(f"bundle {root}: cannot resolve its network_def ({type(err).__name__}: {err})") from err
    if not isinstance(network, Mapping) or "_target_" not in network:
        raise UserError(f"bundle {root}: its network_def is not a component with a _target_ (got {network!r})")
    return dict(network)


def _read_bundle(root: Path) -> tuple[dict[str, torch.Tensor], LoadReport]:
    network = _bundle_network(root)
    weights = root / _BUNDLE_WEIGHTS
    if not weights.is_file():
        torchscript = root / "models" / "model.ts"
        raise UserError(f"bundle {root}: no {_BUNDLE_WEIGHTS} (the bundle's weights)"
                        + ("; only a TorchScript model.ts, which holds no state dict to adapt: export model.pt from it"
                           if torchscript.is_file() else "; re-export the bundle"))
    state, _, _ = _unwrap(load_checkpoint(weights), str(weights))
    args = {k: v for k, v in network.items() if not str(k).startswith("_")}
    report = LoadReport(path=str(root), source_format="MONAI Bundle",
                        checkpoint_config={"model": args, "bundle_network": str(network["_target_"])})
    return _strip_prefixes(state), report


def read_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The tensors of a checkpoint file, adapter folder or MONAI Bundle (wrappers and prefixes removed) and a report
    naming its format and stored config (a Bundle's: ``{"model": network_def's arguments, "bundle_network": class}``)."""
    from tcurlora_seg.adapters.files import ADAPTER_CONFIG, is_adapter_folder

    path = os.fspath(path)
    if is_adapter_folder(path):
        return _strip_prefixes(_merged_adapter_folder(path)), LoadReport(path=path, source_format="adapter folder")
    if is_bundle(path):
        return _read_bundle(Path(path))
    if Path(path).is_dir():
        raise UserError(f"model.pretrained={path}: a folder that is neither an adapter folder ({ADAPTER_CONFIG}) "
                        "nor a MONAI Bundle (configs/inference.json + models/model.pt); point at a checkpoint file or one "
                        "of those")
    state, source_format, config = _unwrap(load_checkpoint(path), path)
    return _strip_prefixes(state), LoadReport(path=path, source_format=source_format, checkpoint_config=config)


def saved_model_config(report: LoadReport) -> Mapping[str, Any] | None:
    """The ``model`` section the source records (ours, a Bundle's network), or None."""
    config = report.checkpoint_config
    saved = config.get("model", config) if isinstance(config, Mapping) else None
    return saved if isinstance(saved, Mapping) else None


# --- checking a Bundle's network against the model -------------------------------------------------------------------

def _canonical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def check_network(report: LoadReport, classes: Sequence[str], own: Mapping[str, Any], *, adaptable: Mapping[str, str],
                  harmless: Sequence[str], backbone: str) -> None:
    """Compare a Bundle's network (class and arguments) with the run's model ``own`` (the same keys, read from the
    model); a note for differences the loader adapts or that hold no weights, one UserError for the rest.

    ``classes``: the ``_target_`` names of this backbone (``UNETR``, ``monai.networks.nets.UNETR``, ...);
    ``adaptable``: key -> what the loader does about it; ``harmless``: keys that change no tensor (dropout, ...).
    """
    config = report.checkpoint_config or {}
    target = config.get("bundle_network")
    if target is None:
        return
    name = str(target).rsplit(".", 1)[-1]
    if name not in classes:
        other = {"UNETR": "unetr", "SwinUNETR": "swin_unetr"}.get(name)
        raise UserError(f"bundle {report.path}: its network is {target}, " + (
            f"a {name}: set model={other} (or model.backbone={other}) to load it" if other else
            "neither UNETR nor SwinUNETR; only those two can be fine-tuned here") + f", not {backbone}")
    args = dict(config.get("model") or {})
    if "pos_embed" in args and "proj_type" not in args:  # the old MONAI name of proj_type
        args["proj_type"] = args.pop("pos_embed")
    adapted, ignored, refused = [], [], []
    for key, value in sorted(args.items()):
        if isinstance(value, int) and isinstance(own.get(key), list):  # img_size=96 means [96, 96, 96]
            value = [value] * len(own[key])
        if key not in own or _canonical(value) == _canonical(own[key]):
            continue  # keys the model cannot be asked about (spatial_dims, ...) are left to the tensors' shape check
        text = f"{key} {_canonical(value)} vs the model's {_canonical(own[key])}"
        if key in adaptable:
            adapted.append(f"{text} ({adaptable[key]})")
        elif key in harmless:
            ignored.append(text)
        else:
            refused.append(text)
    if refused:
        raise UserError(f"bundle {report.path}: its {name} differs from the run's model in {'; '.join(refused)}: these "
                        "cannot be adapted; set the model config to the bundle's values (model.<key>=...)")
    if adapted or ignored:
        report.notes.append(f"Bundle network {name} vs the run's model: "
                            + "; ".join(adapted + [f"{t} (holds no weights)" for t in ignored]) + ".")
    else:
        report.notes.append(f"Bundle network {name}: the same architecture as the run's model.")


# --- adaptations -----------------------------------------------------------------------------------------------------

def resample_grid(table: torch.Tensor, src: Sequence[int], dst: Sequence[int]) -> torch.Tensor:
    """A (prod(src), C) table whose rows lie on a 3-D grid in row-major order, resampled to (prod(dst), C) over the
    grid by trilinear interpolation (align_corners False: cell centres, as timm's 2-D ``resample_abs_pos_embed``);
    the same tensor when the grids are equal."""
    src, dst = tuple(int(s) for s in src), tuple(int(s) for s in dst)
    if src == dst:
        return table
    channels = table.shape[-1]
    grid = table.reshape(*src, channels).permute(3, 0, 1, 2).unsqueeze(0).float()  # (1, C, *src)
    out = F.interpolate(grid, size=dst, mode="trilinear", align_corners=False)  # (1, C, *dst)
    return out.squeeze(0).permute(1, 2, 3, 0).reshape(-1, channels).to(table.dtype)


def cube_side(n: int) -> int | None:
    """s with s**3 == n, or None."""
    side = round(n ** (1 / 3))
    return side if side**3 == n else None


def channels_option(value: Any, path: str, c_src: int, c_tgt: int) -> list[int] | str | None:
    """``model.pretrained_channels`` checked against the checkpoint's and the model's channel counts."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "mean":
            raise UserError(f"model.pretrained_channels={value!r}: give mean or a list of source channel indices, one per "
                            f"model input channel (the checkpoint {path} has {c_src})")
        return value
    if not isinstance(value, Sequence) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"model.pretrained_channels={value!r}: give mean or a list of ints (source channel indices)")
    mapping = list(value)
    if len(mapping) != c_tgt:
        raise UserError(f"model.pretrained_channels={mapping}: {len(mapping)} entries for a model with {c_tgt} input "
                        f"channel(s) (model.in_channels); give one source channel (of the {c_src} of {path}) per model "
                        "channel")
    bad = [c for c in mapping if not 0 <= c < c_src]
    if bad:
        raise UserError(f"model.pretrained_channels={mapping}: index {bad[0]} out of range: the checkpoint {path} has "
                        f"{c_src} input channel(s), indices 0..{c_src - 1}")
    return mapping


def adapt_input_channels(state: dict[str, torch.Tensor], keys: Sequence[str], c_tgt: int, option: Any,
                         path: str) -> str | None:
    """Map the input-channel axis (dim 1, conv layout (out, in, *kernel)) of the tensors in ``keys`` that read the
    image from the checkpoint's channel count to ``c_tgt``, in place; return the report's note, or None.

    ``option`` (``model.pretrained_channels``): a source channel per model channel (BraTS [t1, t1ce, t2, flair] into a
    T1ce-only model: ``[1]``), or ``mean``: every model channel gets the source filters' mean times c_src / c_tgt, so
    that on channels alike the first activations keep their size (Σ_c W_c x ≈ c_tgt · W' x). Without it a channel
    mismatch is an error naming the key.
    """
    present = [k for k in keys if k in state]
    if not present:
        return None
    c_src = int(state[present[0]].shape[1])
    mapping = channels_option(option, path, c_src, c_tgt)
    if mapping is None:
        if c_src == c_tgt:
            return None
        raise UserError(f"checkpoint {path}: reads {c_src} input channel(s), the model {c_tgt} (model.in_channels): set "
                        f"model.pretrained_channels to a source channel per model channel (e.g. [{min(1, c_src - 1)}]) "
                        "or to mean")
    for key in present:
        weight = state[key]
        if weight.shape[1] != c_src:  # not this tensor's to adapt; the shape check reports it
            continue
        if mapping == "mean":
            mean = weight.float().mean(dim=1, keepdim=True) * (c_src / c_tgt)
            state[key] = mean.expand(-1, c_tgt, *weight.shape[2:]).contiguous().to(weight.dtype)
        else:
            state[key] = weight[:, mapping].contiguous()
    how = ("the mean of the source filters x " f"{c_src}/{c_tgt}" if mapping == "mean"
           else ", ".join(f"model channel {j} <- source channel {c}" for j, c in enumerate(mapping)))
    return (f"Input channels {c_src} -> {c_tgt} (model.pretrained_channels={mapping}: "
            f"{how}) in {', '.join(present)}.")


# --- loading ---------------------------------------------------------------------------------------------------------

def _reset(model: torch.nn.Module, keys: list[str]) -> None:
    for name in sorted({k.rsplit(".", 1)[0] for k in keys}):
        module = model.get_submodule(name)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def apply_load(model: torch.nn.Module, report: LoadReport, state: Mapping[str, torch.Tensor],
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


def grid_text(grid: Sequence[int]) -> str:
    return "x".join(str(int(g)) for g in grid)


def prod(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)
