"""The source model a fine-tuning run starts from, when a config pairs its data with a pretraining experiment.

``ensure_pretrained(cfg)`` runs ``pretrain_experiment`` (``python -m tcurlora_seg.train +experiment=...``, one
process) when ``model.pretrained`` is missing or stale: the embedded demo pretrains its own source model once and
caches it inside the demo cache, keyed by the generator version (the cache is built first and rebuilt when stale,
the old model with it) and by the model config (a file pretrained for another architecture is pretrained again).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.errors import UserError

__all__ = ["ensure_pretrained"]

log = logging.getLogger("tcurlora_seg")


def _source_mismatch(path: Path, cfg: DictConfig) -> list[str]:
    """The model keys in which ``path``'s own config (an export of ``pretrain_experiment``) differs from this run's
    model; [] when it fits. A file without a config (not made by the pretraining experiment) is left to the load."""
    from tcurlora_seg.models import architecture
    from tcurlora_seg.models.checkpoint import load_checkpoint

    stored = load_checkpoint(path).get("config")
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        return []
    ours = OmegaConf.to_container(cfg.model, resolve=True)
    (backbone, _, theirs), (own, _, arch) = architecture(stored["model"]), architecture(ours)
    if backbone != own:
        return [f"model.backbone: {backbone!r} vs {own!r}"]
    return [f"model.{key}: {stored['model'].get(key)!r} vs {ours.get(key)!r}" for key in (*arch, *theirs, "img_size")
            if stored["model"].get(key) != ours.get(key)]


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, (bool, list)) else value}"


def ensure_pretrained(cfg: DictConfig) -> None:
    """Run ``pretrain_experiment`` when ``model.pretrained`` is missing or stale (the demo creates its source model once).

    The demo's source model is keyed by the generator version and the model config: it lives inside the demo cache,
    which is built first (a cache of another generator version is rebuilt, the old model with it), and a cached file
    pretrained for another architecture than this run's is pretrained again, for this run's architecture.
    """
    from tcurlora_seg.engine.run import is_scratch

    path = cfg.model.get("pretrained")
    experiment = cfg.get("pretrain_experiment")
    if not path or is_scratch(cfg):  # training from scratch needs no source model: none is pretrained for it
        return
    if experiment and cfg.data.get("demo"):
        from tcurlora_seg.data.demo import build_demo

        root = Path(cfg.data.root)
        build_demo(root.parent, seed=int(cfg.data.demo.get("seed", 0)), tasks=[cfg.data.demo.get("task", root.name)])
    if Path(path).is_dir() and not experiment:
        return  # an adapter folder or a MONAI Bundle: the loader reads and checks it
    if Path(path).is_file():
        stale = _source_mismatch(Path(path), cfg) if experiment else []
        if not stale:
            return
        log.info(f"{path} was pretrained for another model ({'; '.join(stale)}): pretraining it again")
    elif not experiment:
        raise UserError(f"model.pretrained={path}: not found; pass the source model (a checkpoint file, adapter folder or MONAI Bundle; model.pretrained=null trains from scratch)")
    else:
        log.info(f"{path} not found: pretraining it first with +experiment={experiment}")
    from tcurlora_seg.models import architecture, build_network

    # this run's model must build before minutes go into pretraining a source model for it (one error, not two)
    build_network(cfg.model, img_size=OmegaConf.select(cfg, "data.roi_size"))
    # pretrain for this run's architecture; channels and classes follow from the data, img_size from data.roi_size
    model = OmegaConf.to_container(cfg.model, resolve=True)
    _, _, arch = architecture(model)
    overrides = [_override(f"model.{key}", value) for key, value in arch.items() if key not in ("in_channels", "out_channels")]
    command = [sys.executable, "-m", "tcurlora_seg.train", f"+experiment={experiment}", f"seed={cfg.seed}",
               f"trainer.device={cfg.trainer.device}", f"trainer.progress={cfg.trainer.progress}",
               _override("data.roi_size", list(model["img_size"])), *overrides]
    # one process: under torchrun, rank 0 pretrains while the others wait, so torchrun's variables must not reach it
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    if subprocess.run(command, env=env).returncode != 0 or not Path(path).is_file():
        raise UserError(f"pretraining with +experiment={experiment} did not produce {path}; see its output above")
    stale = _source_mismatch(Path(path), cfg)
    if stale:
        raise UserError(f"+experiment={experiment} pretrains {path} for another model than this run's ({'; '.join(stale)}); "
                        "pass model.pretrained=PATH of a source model that fits, or drop the model overrides")
