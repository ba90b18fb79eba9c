"""What the HF-peft baselines (LoRA, DoRA, PiSSA, LoHa, LoKr) share: targets, injection, freezing.

peft is imported inside the functions only: importing it pulls in transformers and costs seconds, and the tCURLoRA
path never needs it. Layers are injected with ``peft.inject_adapter_in_model`` into the plain MONAI network (no
``PeftModel`` wrapper), so the model's own state-dict names, forward and our registry stay as they are.
"""

from __future__ import annotations

import re
import sys

from torch import nn

from .backbones import linear_paths
from .base import freeze_for_adapter

__all__ = ["target_regex", "inject_peft", "peft_layers"]


def target_regex(model: nn.Module, targets: tuple[str, ...]) -> str:
    """A full-match regex for exactly the linears ``targets`` (UNETR's names) of every transformer block of ``model``:
    never a decoder, head, patch-merging or patch-embedding module."""
    return "|".join(re.escape(path) for path in linear_paths(model, targets))


def peft_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft layer of ``model``; none when peft was never imported (so no need to import it to find out)."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return []
    return [m for m in model.modules() if isinstance(m, tuners.BaseTunerLayer)]


def inject_peft(model: nn.Module, peft_config, train_out: bool) -> list[nn.Module]:
    """Inject ``peft_config``'s layers into ``model`` in place; train them, ``decoder2..5`` and (``train_out``) ``out``.

    peft itself marks only its own tensors trainable; the paper's protocol also trains the decoder (DESIGN.md §1.4).
    Returns the injected layers.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config, model)
    freeze_for_adapter(model, train_out=train_out)
    layers = peft_layers(model)
    for layer in layers:
        for name, param in layer.named_parameters():
            if not name.startswith("base_layer."):
                param.requires_grad_(True)
    return layers

