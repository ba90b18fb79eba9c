"""Adapter folders in peft's convention: ``adapter_config.json`` beside ``adapter_model.safetensors``, no pickle.

    save_adapter(model, "run/adapter")                 # any adapted model (apply_adapter), built by the app or not
    load_adapter(fresh_pretrained_model, "run/adapter")  # applies the file's method, checks the base, loads

The JSON says what the tensors are for: the method and its options, the fingerprint of the frozen base they were
trained on, the base model's config (when the saver knows it), which modules trained and the package version. The
safetensors file holds ``adapter_state_dict``'s tensors: what trained plus the CUR indices / initial factors a
method needs to rebuild its layers on the pretrained base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tcurlora_seg.atomic import atomic_write

from . import adapter_state_dict, apply_adapter, load_adapter_state_dict

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FORMAT", "save_adapter", "write_adapter", "load_adapter", "read_adapter",
           "read_adapter_config", "is_adapter_folder"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "tcurlora_seg.adapter/1"


def _plain(value: Any) -> Any:
    """Options as JSON holds them (tuples become lists), so that a config read back compares equal."""
    return json.loads(json.dumps(value))


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter(model: nn.Module, folder: str | os.PathLike, *, base_model_config: dict | None = None) -> Path:
    """Write ``model``'s adapter into ``folder`` (created); returns the folder.

    ``base_model_config``: the base network's config (e.g. the run's ``model`` section with ``img_size``), recorded so
    that a reader knows which base to build; None when the saver does not know it.
    """
    return write_adapter(adapter_state_dict(model), folder, base_model_config=base_model_config)


def write_adapter(state: dict, folder: str | os.PathLike, *, base_model_config: dict | None = None) -> Path:
    """``save_adapter`` from an ``adapter_state_dict`` (e.g. a training checkpoint's ``adapter``), without the model."""
    from safetensors.torch import save

    from tcurlora_seg import __version__

    tensors = {name: tensor.contiguous() for name, tensor in state["state_dict"].items()}
    config = {
        "format": FORMAT,
        "method": state["adapter"],
        "options": _plain(state["options"]),
        "base_fingerprint": state["base_fingerprint"],
        "base_model_config": _plain(base_model_config) if base_model_config is not None else None,
        # the modules whose tensors are in the file: the method's layers, the decoder, any train_extra
        "trained_modules": sorted({name.rpartition(".")[0] for name in tensors}),
        "package_version": __version__,
    }
    folder = Path(folder)
    # atomically (atomic_write creates the folder), weights first: a reader never sees half a file, and a folder's config always has its weights
    fix = "save the adapter again"
    atomic_write(folder / ADAPTER_WEIGHTS, lambda f: f.write(save(tensors, metadata={"format": FORMAT})),
                 what="adapter file", fix=fix)
    atomic_write(folder / ADAPTER_CONFIG, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()),
                 what="adapter file", fix=fix)
    return folder


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """The config of an adapter folder (its tensors not read); ValueError naming the file and the fix when either file
    is missing or the config is damaged."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    for path in (config_path, folder / ADAPTER_WEIGHTS):
        if not path.is_file():
            raise ValueError(f"{path} not found: point at a folder written by save_adapter (a run's adapter/)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); save the adapter again with save_adapter") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT or not {"method", "options"} <= config.keys():
        raise ValueError(f"{config_path} is not a tcurlora_seg adapter config (format {FORMAT}); save the adapter again "
                         "with save_adapter")
    return config


def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter folder; ValueError naming the file and the fix when either is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(folder)
    weights_path = Path(folder) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is damaged or truncated ({err}); save the adapter again with save_adapter") from err
    return config, tensors


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Apply the folder's adapter onto ``model`` (an un-adapted pretrained base, or one adapted with the same method
    and options) and load its tensors; returns the model.

    ValueError, naming the folder, for another base (frozen weights differ), another method or options, missing or
    unexpected tensors, other shapes.
    """
    config, tensors = read_adapter(folder)
    try:
        if getattr(model, "adapter_config", None) is None:
            apply_adapter(model, config["method"], **config["options"])
        own = model.adapter_config
        if own["name"] != config["method"] or _plain(own["options"]) != config["options"]:
            raise ValueError(f"adapter mismatch: the model has {own['name']} {_plain(own['options'])}, the file "
                             f"{config['method']} {config['options']}; load onto a fresh pretrained model")
        # the model's own options (tuples where the method keeps tuples) stand for the JSON's equal ones
        state = {"adapter": config["method"], "options": own["options"],
                 "base_fingerprint": config.get("base_fingerprint"), "state_dict": tensors}
        return load_adapter_state_dict(model, state)
    except ValueError as err:
        raise ValueError(f"{Path(folder)}: {err}") from err
