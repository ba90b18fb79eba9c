"""What every adapter method shares: which parts of a UNETR train, the base-model fingerprint, the layer protocol."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["DECODER", "AdapterLayer", "freeze_for_adapter", "base_fingerprint", "count_trainable"]

# UNETR's up-sampling path (DESIGN.md §1.4): trained fully by every PEFT method of the paper.
DECODER = ("decoder2", "decoder3", "decoder4", "decoder5")


class AdapterLayer(nn.Module):
    """Marker base for a layer that wraps one frozen module (``base_layer``) and can fold its update in and out."""

    merged: bool = False

    def merge(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def unmerge(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def freeze_for_adapter(model: nn.Module, *, train_decoder: bool = True, train_out: bool = False) -> None:
    """Freeze everything, then unfreeze ``decoder2..5`` and, if asked, the ``out`` head.

    The ``out`` head is frozen in the paper's code; it must train when the target's class count differs from the source.
    """
    model.requires_grad_(False)
    trainable = (DECODER if train_decoder else ()) + (("out",) if train_out else ())
    for name in trainable:
        module = getattr(model, name, None)
        if module is None:
            raise ValueError(f"{type(model).__name__} has no `{name}` module: adapters expect a MONAI UNETR")
        module.requires_grad_(True)


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the frozen parameters (names, shapes, bytes): identifies the base an adapter was trained on.

    Names are taken as before wrapping (``.base_layer`` dropped), so the value is the same before and after an adapter
    is applied, as long as it is not merged.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        name = name.replace(".base_layer", "")
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_trainable(model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
