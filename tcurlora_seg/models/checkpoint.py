"""Checkpoint files: atomic save (``tcurlora_seg.atomic.atomic_write``), and a load that never runs pickled code.

A checkpoint is a dict of tensors and plain Python values (our layout: ``{"model": state_dict, "config": {...}, ...}``).
Loading always uses ``torch.load(..., weights_only=True)``: a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from tcurlora_seg.atomic import atomic_write
from tcurlora_seg.errors import UserError

__all__ = ["atomic_write", "load_checkpoint", "save_checkpoint"]

# Types that torch.load(weights_only=True) accepts without extra allow-listing.
_PLAIN = (torch.Tensor, str, bytes, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` with configs, paths and numpy values turned into types a weights-only load accepts."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        items = {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
        # Keep the original object when nothing changed: a state_dict keeps its _metadata (module versions).
        if isinstance(value, dict) and all(items[k] is v for k, v in value.items()):
            return value
        return items
    if isinstance(value, (list, tuple, set)):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    # A programming error, not a user one: this object would make the file unloadable with weights_only=True.
    raise TypeError(f"checkpoint payload {where} has type {type(value).__name__}, which weights_only loading refuses")


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`atomic_write`) and return the path.

    DictConfig, Path and numpy values are converted so that :func:`load_checkpoint` can read the file back.
    """
    payload = _plain(dict(payload), "payload")
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU with ``weights_only=True``.

    Raises:
        UserError: the file is missing, is not a PyTorch checkpoint (truncated, corrupt, another format),
            carries pickled Python objects, or does not hold a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: no such file; check the path (e.g. model.pretrained)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports bad files with many types (RuntimeError, EOFError, KeyError, ...)
        if "Weights only load failed" in str(err):
            raise UserError(
                f"checkpoint {path}: holds pickled Python objects besides tensors, refused for safety "
                "(weights_only=True); re-save it as a dict of tensors and plain values, e.g. "
                "torch.save({'state_dict': model.state_dict()}, path)"
            ) from err
        raise UserError(
            f"checkpoint {path}: not a readable PyTorch checkpoint (truncated, corrupt or another format: "
            f"{type(err).__name__}); re-download or re-save it"
        ) from err
    if not isinstance(obj, dict):
        raise UserError(
            f"checkpoint {path}: holds a {type(obj).__name__}, expected a dict such as a state_dict or "
            "{'model': state_dict, 'config': ...}; re-save it as a dict"
        )
    return obj
