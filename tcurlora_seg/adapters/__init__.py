"""Parameter-efficient adapters for a MONAI UNETR or SwinUNETR (``backbones``), behind one registry.

Named ``adapters`` so as not to be confused with HF ``peft`` (which the LoRA-family baselines use underneath).

    apply_adapter(model, "tcurlora", rank=8)      # in place; returns the model
    merge_adapter(model) / unmerge_adapter(model)
    state = adapter_state_dict(model)             # only what trained + indices + options + base fingerprint
    load_adapter_state_dict(fresh_pretrained_model, state)
    save_adapter(model, "run/adapter") / load_adapter(fresh_pretrained_model, "run/adapter")   # JSON + safetensors

Methods (``peft=NAME``; defaults and trainable-count formulas in each module's docstring):
``full``, ``decoder_only`` (full.py; ``peft=scratch`` is ``full`` on a base that ``engine.run.build_model`` leaves
unloaded); ``lora``, ``dora``, ``pissa`` (lora.py), ``loha``, ``lokr`` (HF peft);
``curlora`` (matrix CUR), ``lora_pt`` (principal t-SVD), ``tcurlora`` (tensor CUR, the paper's method).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch
from torch import nn

from .base import AdapterLayer, base_fingerprint, count_trainable, parameter_digests, trainable_groups, unfreeze
from .curlora import CURLoRAConfig, apply_curlora
from .full import DecoderOnlyConfig, FullConfig, apply_decoder_only, apply_full
from .hf_peft import peft_layers
from .loha import LoHaConfig, apply_loha
from .lokr import LoKrConfig, apply_lokr
from .lora import DoRAConfig, LoRAConfig, PiSSAConfig, apply_dora, apply_lora, apply_pissa, restore_pissa_init
from .lora_pt import LoRAPTConfig, apply_lora_pt, restore_lora_pt_init
from .tcurlora import TCURLoRAConfig, apply_tcurlora

__all__ = [
    "ADAPTERS",
    "apply_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "adapter_layers",
    "merged_state_dict",
    "count_trainable",
    "trainable_groups",
    "TCURLoRAConfig",
    "FullConfig",
    "DecoderOnlyConfig",
    "LoRAConfig",
    "DoRAConfig",
    "PiSSAConfig",
    "LoHaConfig",
    "LoKrConfig",
    "CURLoRAConfig",
    "LoRAPTConfig",
]

# name -> function(model, **options) that adapts the model in place and returns its resolved options (plain types)
ADAPTERS: dict[str, Callable[..., dict]] = {
    "full": apply_full,
    "decoder_only": apply_decoder_only,
    "lora": apply_lora,
    "dora": apply_dora,
    "pissa": apply_pissa,
    "loha": apply_loha,
    "lokr": apply_lokr,
    "curlora": apply_curlora,
    "lora_pt": apply_lora_pt,
    "tcurlora": apply_tcurlora,
}

# Buffers an adapter file carries besides the trainable parameters. Selected CUR indices: must equal the ones this
# base yields. Initial factors of the methods that rewrite the base into a residual (PiSSA, LoRA-PT): used to rebuild
# that residual from the pretrained base, by the method's restore function.
_INDEX_BUFFERS = ("tcur_rows", "tcur_cols", "cur_rows", "cur_cols")
_INIT_BUFFERS = ("pissa_A0", "pissa_B0", "lorapt_U0", "lorapt_S0", "lorapt_V0")
_SAVED_BUFFERS = _INDEX_BUFFERS + _INIT_BUFFERS
_RESTORE_INIT: dict[str, Callable[[nn.Module, dict], None]] = {"pissa": restore_pissa_init, "lora_pt": restore_lora_pt_init}


def apply_adapter(model: nn.Module, name: str, *, train_extra: Sequence[str] = (), **options) -> nn.Module:
    """Adapt ``model`` in place with the method ``name`` and return it. Raises ValueError for a bad name or option.

    ``train_extra``: modules of the model (``encoder1``, ``vit.patch_embedding``, ``vit.blocks``, ...) that train fully
    on top of the method, as the decoder does (and at its lr): to find out which frozen part a gap to full fine-tuning
    comes from. Recorded in the options, so the adapter file carries them and loading unfreezes them again.
    """
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError(f"model already has adapter '{model.adapter_config['name']}'; build a fresh model to apply another")
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter '{name}' (peft.name); choose one of {sorted(ADAPTERS)}")
    pretrained = parameter_digests(model)  # before the method: PiSSA and LoRA-PT rewrite the frozen weights
    model.adapter_base_keys = list(model.state_dict())  # the plain model's keys, for merged_state_dict
    try:
        resolved = ADAPTERS[name](model, **options)
    except TypeError as err:  # an option the method does not have
        raise ValueError(f"adapter '{name}': {err}") from err
    if train_extra:
        resolved = {**resolved, "train_extra": unfreeze(model, train_extra)}
    model.adapter_config = {"name": name, "options": resolved, "base_fingerprint": base_fingerprint(model, pretrained)}
    return model


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """Every wrapped layer of ``model``: ours (``AdapterLayer``) and peft's (``BaseTunerLayer``); none for full / decoder_only.

    All of them have ``merge()``, ``unmerge()`` and ``merged``.
    """
    return [m for m in model.modules() if isinstance(m, AdapterLayer)] + peft_layers(model)


def _config(model: nn.Module) -> dict:
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("model has no adapter: call apply_adapter(model, name, ...) first")
    return config


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every adapter update into its base weight, so inference costs the base model (no-op without layers)."""
    _config(model)
    for layer in adapter_layers(model):
        if not layer.merged:  # peft warns on a second merge; ours ignore it
            layer.merge()
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapter``: the base weights return to their values before merging, up to float rounding.

    That is the pretrained weight, except for PiSSA and LoRA-PT, whose frozen base is the residual.
    """
    _config(model)
    for layer in adapter_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fine-tuned model as a plain UNETR state dict (ΔW folded in, adapter tensors dropped), on CPU.

    Loadable into a fresh UNETR without this package's adapters; the model's own merge state is left as it was.
    """
    _config(model)
    unmerged = [layer for layer in adapter_layers(model) if not layer.merged]
    for layer in unmerged:
        layer.merge()
    try:
        # every method keeps the wrapped module as `base_layer` (ours and peft's): its merged tensors are the plain ones
        merged = {name.replace(".base_layer", ""): tensor for name, tensor in model.state_dict().items()}
        return {key: merged[key].detach().cpu().clone() for key in model.adapter_base_keys}
    finally:
        for layer in unmerged:
            layer.unmerge()


def adapter_state_dict(model: nn.Module) -> dict:
    """What a fine-tuned model adds to its base: trainable tensors, CUR indices or initial factors, options, fingerprint.

    Plain types and tensors only, so ``torch.load(..., weights_only=True)`` reads it back.
    """
    config = _config(model)
    tensors = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    tensors.update(
        {n: b.detach().cpu().clone() for n, b in model.named_buffers() if n.rpartition(".")[2] in _SAVED_BUFFERS}
    )
    return {"adapter": config["name"], "options": dict(config["options"]), "base_fingerprint": config["base_fingerprint"], "state_dict": tensors}


def load_adapter_state_dict(model: nn.Module, state: dict) -> nn.Module:
    """Load ``adapter_state_dict`` output into ``model`` (a pretrained base, adapted or not); returns the model.

    Applies the adapter first when the model has none. Refuses a state trained on another base or with other options.
    """
    if not isinstance(state, dict) or not {"adapter", "options", "state_dict"} <= state.keys():
        raise ValueError("not an adapter state: expected the dict returned by adapter_state_dict() (keys adapter, options, state_dict)")
    if getattr(model, "adapter_config", None) is None:
        apply_adapter(model, state["adapter"], **state["options"])
    config = model.adapter_config
    if config["name"] != state["adapter"] or config["options"] != state["options"]:
        raise ValueError(
            f"adapter mismatch: model has {config['name']} {config['options']}, file has {state['adapter']} {state['options']}; "
            "apply the adapter with the file's options or load onto a fresh model"
        )
    if state.get("base_fingerprint") not in (None, config["base_fingerprint"]):
        raise ValueError(
            "adapter was trained on a different base model (frozen weights differ); load the pretrained checkpoint it was fine-tuned from"
        )
    tensors = state["state_dict"]
    own = dict(model.named_parameters())
    expected = {n for n, p in own.items() if p.requires_grad}
    missing = sorted(expected - tensors.keys())
    if missing:
        raise ValueError(f"adapter state lacks trained tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    buffers = dict(model.named_buffers())
    needed = {n for n in buffers if n.rpartition(".")[2] in _INIT_BUFFERS}
    if needed - tensors.keys():
        raise ValueError(
            f"adapter state lacks the initial factors {sorted(needed - tensors.keys())[:2]} that rebuild the {config['name']} "
            "residual base; save it again with adapter_state_dict()"
        )
    for name, value in tensors.items():
        kind = name.rpartition(".")[2]
        if name in buffers and kind in _INDEX_BUFFERS:
            if not torch.equal(buffers[name].cpu(), value):
                raise ValueError(f"{name}: the saved CUR selection differs from this base's; load the base the adapter was trained on")
        elif name in buffers and kind in _INIT_BUFFERS:
            if buffers[name].shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} in the adapter state, {tuple(buffers[name].shape)} in the model")
        elif name not in expected:
            raise ValueError(f"adapter state has unexpected tensor '{name}' for this model")
        elif own[name].shape != value.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} in the adapter state, {tuple(own[name].shape)} in the model")
    merged = [layer for layer in adapter_layers(model) if layer.merged]
    for layer in merged:  # a merged weight holds the old update: take it out before the adapter tensors change
        layer.unmerge()
    if config["name"] in _RESTORE_INIT:
        _RESTORE_INIT[config["name"]](model, tensors)
    with torch.no_grad():
        for name in expected:
            own[name].copy_(tensors[name])
    for layer in merged:
        layer.merge()
    return model


# adapter folders (JSON + safetensors) build on the functions above: imported last, for the package's namespace
from .files import load_adapter, save_adapter  # noqa: E402
