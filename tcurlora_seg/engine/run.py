"""A run folder: its resolved config, its checkpoints, and the model they rebuild.

Layout of a run folder (Hydra's output dir of `python -m tcurlora_seg.train`):
    config.yaml                  the resolved config of the run (what evaluate / predict / resume read)
    split.json                   the cases of each split (data check)
    checkpoints/last.pt          latest state: adapter + optimizer + scheduler + epoch (resume)
    checkpoints/best.pt          best validation Dice (adapter only)
    checkpoints/epoch_NNNN.pt    the last ``trainer.keep_last_epochs`` epochs (adapter only; softmax averaging)
    adapter/                     best.pt's adapter as adapter_config.json + adapter_model.safetensors (peft's
                                 convention, no pickle), written when training ends; checkpoint=adapter loads it
    tensorboard/                 curves and image slices
    train_stats.json             trainable parameters, mean time per training step, peak memory (scripts/compare.py)
    eval/                        metrics.csv, summary.json, predicted labels

A checkpoint is ``{"format", "epoch", "iteration", "metric", "config", "adapter", ["optimizer", "scheduler"]}`` where
``adapter`` is ``adapters.adapter_state_dict(model)``: only what trained, plus indices, options and the base
fingerprint. The base itself is rebuilt from ``config.model`` (and ``model.pretrained``), seeded by ``config.seed``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.adapters import apply_adapter, load_adapter, load_adapter_state_dict, merged_state_dict
from tcurlora_seg.adapters.backbones import backbone_of
from tcurlora_seg.adapters.files import ADAPTER_CONFIG, is_adapter_folder
from tcurlora_seg.errors import UserError
from tcurlora_seg.models.checkpoint import save_checkpoint
from tcurlora_seg.models import LoadReport, build_network, load_checkpoint, load_pretrained

__all__ = [
    "FORMAT",
    "ADAPTER_DIR",
    "SCRATCH",
    "is_scratch",
    "scratch_config",
    "base_model_config",
    "resolve_device",
    "build_model",
    "save_run_config",
    "load_run_config",
    "checkpoint_path",
    "epoch_checkpoints",
    "adapter_folder",
    "restore_model",
    "vit_change",
    "export_merged",
    "latest_run",
]

FORMAT = "tcurlora_seg/1"
CONFIG = "config.yaml"
ADAPTER_DIR = "adapter"
# peft=scratch: the backbone trained from its seeded random init, whatever model.pretrained says (issue 29's
# reference: is transfer worth it?). The run saves model.pretrained=null, so every rebuild of it skips the file.
SCRATCH = "scratch"


def resolve_device(name: str) -> torch.device:
    """``trainer.device``: auto | cpu | cuda | cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"trainer.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name}: no CUDA device here; use trainer.device=cpu")
    return device


def _peft_options(cfg: DictConfig, report: LoadReport | None) -> tuple[str, dict[str, Any]]:
    options = OmegaConf.to_container(cfg.peft, resolve=True)
    name = options.pop("name")
    if name == SCRATCH:  # not an adapter: full training of a base that was not loaded
        name = "full"
    if options.get("train_out") == "auto":  # the head must learn when it is new (no source model, other class count)
        options["train_out"] = report is None or report.out_reinitialised
    return name, options


def is_scratch(cfg: DictConfig) -> bool:
    """Whether ``cfg`` trains from scratch (``peft=scratch``): no pretrained weights, no source model, no zero-shot."""
    return OmegaConf.select(cfg, "peft.name") == SCRATCH


def scratch_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``model.pretrained`` null when it trains from scratch (in place; returned for chaining): the run
    folder's config.yaml then says so, and the demo's source model is neither pretrained nor loaded for it."""
    if is_scratch(cfg) and cfg.model.get("pretrained"):
        logging.getLogger("tcurlora_seg").info(f"peft={SCRATCH}: model.pretrained={cfg.model.pretrained} ignored "
                                               "(training from the seeded random init)")
        cfg.model.pretrained = None
    return cfg


def build_model(cfg: DictConfig, *, pretrained: bool = True) -> tuple[torch.nn.Module, LoadReport | None]:
    """The network of ``cfg.model`` (UNETR or Swin UNETR), its pretrained weights and ``cfg.peft``'s adapter (on CPU).

    Seeded with ``cfg.seed`` first: a base that is not loaded from a file (training from scratch) is then the same
    every time the run is rebuilt, so the adapter's base fingerprint still matches.
    """
    torch.manual_seed(int(cfg.seed))
    model = build_network(cfg.model, img_size=OmegaConf.select(cfg, "data.roi_size"))  # errors name data.roi_size
    report = None
    if pretrained and cfg.model.get("pretrained") and not is_scratch(cfg):
        channels = OmegaConf.to_container(cfg.model, resolve=True).get("pretrained_channels")
        report = load_pretrained(model, cfg.model.pretrained, channels=channels)
    name, options = _peft_options(cfg, report)
    try:
        apply_adapter(model, name, **options)
    except ValueError as err:  # a bad peft.* option: the message names the key
        raise UserError(str(err)) from err
    return model, report


def base_model_config(config: dict) -> dict | None:
    """What an adapter folder records of its base: the run's ``model`` section, the ``img_size`` it was built with
    and the seed that initialised whatever the pretrained file did not hold (``model.pretrained=FOLDER`` rebuilds it);
    None for a config without a model section."""
    if not isinstance(config.get("model"), dict):
        return None
    return {**config["model"], "img_size": (config.get("data") or {}).get("roi_size"), "seed": config.get("seed")}


def save_run_config(cfg: DictConfig, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config into the run folder (what evaluate, predict and resume rebuild from)."""
    path = Path(run_dir) / CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(resolved))
    os.replace(tmp, path)
    return path


def load_run_config(run_dir: str | os.PathLike) -> DictConfig:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"run_dir={run_dir}: no {CONFIG}; point run_dir at a folder written by tcurlora_seg.train")
    return OmegaConf.load(path)


def checkpoint_path(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """``best`` | ``last`` | ``epoch_NNNN`` | a file path."""
    path = Path(which) if which.endswith(".pt") else Path(run_dir) / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train first, or choose checkpoint=best|last|epoch_NNNN")
    return path


def epoch_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The kept per-epoch checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    kept = [p for p in folder.glob("epoch_*.pt") if re.fullmatch(r"epoch_\d+\.pt", p.name)]
    return sorted(kept, key=lambda p: int(p.stem.split("_")[1]))


def adapter_folder(run_dir: str | os.PathLike, which: str) -> Path | None:
    """``which`` as an adapter folder: ``adapter`` (the run's own ``adapter/``) or a folder path; None for a .pt
    checkpoint (``best`` | ``last`` | ``epoch_NNNN`` | a file)."""
    path = Path(run_dir) / ADAPTER_DIR if which == ADAPTER_DIR else Path(which)
    if which != ADAPTER_DIR and not path.is_dir():
        return None
    if not is_adapter_folder(path):
        raise UserError(f"checkpoint={which}: {path} holds no {ADAPTER_CONFIG} (a run writes {ADAPTER_DIR}/ when its "
                        "training ends); choose checkpoint=best|last|epoch_NNNN or a folder written by save_adapter")
    return path


def restore_model(run_dir: str | os.PathLike, which: str = "best") -> tuple[torch.nn.Module, DictConfig, dict]:
    """Rebuild the fine-tuned model of a run: base from config (+ model.pretrained) and the checkpoint's adapter
    (a training checkpoint, or an adapter folder: ``which`` = ``adapter`` or its path)."""
    cfg = load_run_config(run_dir)
    folder = adapter_folder(run_dir, which)
    if folder is not None:
        model, _ = build_model(cfg)
        try:
            load_adapter(model, folder)
        except ValueError as err:  # it names the folder and the fix
            raise UserError(str(err)) from err
        return model, cfg, {"format": FORMAT, "adapter_folder": str(folder)}
    path = checkpoint_path(run_dir, which)
    payload = load_checkpoint(path)
    if payload.get("format") != FORMAT or "adapter" not in payload:
        raise UserError(f"{path} is not a tcurlora_seg training checkpoint (format {FORMAT})")
    model, _ = build_model(cfg)
    try:
        load_adapter_state_dict(model, payload["adapter"])
    except ValueError as err:
        raise UserError(f"{path}: {err}") from err
    return model, cfg, payload


def vit_change(run_dir: str | os.PathLike, which: str = "best") -> float:
    """How far fine-tuning moved the ViT: ‖W_tuned − W_start‖ / ‖W_start‖ (Frobenius, %) over the weight matrices of
    every transformer block (Swin UNETR: of every stage), with each method's update folded in (ΔW merged).

    W_start is the same config's model before training: every method starts at zero effect, so its merged weights
    are the pretrained ones. 0 for decoder-only; says whether an adapter changed the encoder at all in a budget.
    """
    tuned, cfg, _ = restore_model(run_dir, which)
    start, _ = build_model(cfg)
    after, before = merged_state_dict(tuned), merged_state_dict(start)
    stages = tuple(f"{stage}." for stage in backbone_of(start).stages)  # the transformer blocks, every stage
    keys = [k for k, w in before.items() if k.startswith(stages) and k.endswith(".weight") and w.ndim == 2]
    moved = sum(float((after[k].double() - before[k].double()).square().sum()) for k in keys)
    size = sum(float(before[k].double().square().sum()) for k in keys)
    return 100.0 * (moved / size) ** 0.5


def export_merged(model, cfg: DictConfig, path: str) -> Path:
    """The merged model as a plain UNETR checkpoint (usable as model.pretrained of a later run)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    out = save_checkpoint(Path(path), {"model": merged_state_dict(model), "config": config})
    logging.getLogger("tcurlora_seg").info(f"exported the merged model to {out}")
    return out


def latest_run(root: str | os.PathLike = "outputs") -> Path:
    """The most recently written run folder under ``root`` (for `make eval` without RUN=)."""
    runs = [p.parent for p in Path(root).glob(f"**/{CONFIG}") if (p.parent / "checkpoints").is_dir()]
    if not runs:
        raise UserError(f"no training run under {root}/; run `make train` first or pass run_dir=PATH")
    return max(runs, key=lambda p: (p / CONFIG).stat().st_mtime)
