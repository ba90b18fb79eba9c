"""The two ends of the scale: full fine-tuning and decoder-only (no adapter layers; merge is a no-op).

- ``full``: every parameter trains; the adapter file is the whole model.
- ``decoder_only``: only ``decoder2..5`` (and, with ``train_out``, the ``out`` head) train: what the official
  t-CURLoRA code effectively trains, since its U tensors never reach the optimizer (DESIGN.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .base import freeze_for_adapter, options_dict

__all__ = ["FullConfig", "DecoderOnlyConfig", "apply_full", "apply_decoder_only"]


def _check_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"peft.{key} must be true or false, got {value!r}")


@dataclass
class FullConfig:
    """Options of ``apply_adapter(model, "full", **options)``."""

    train_out: bool = field(
        default=True, metadata={"help": "accepted for a uniform interface; the `out` head trains regardless"}
    )

    def __post_init__(self) -> None:
        _check_bool("train_out", self.train_out)
        self.train_out = True  # everything trains: record what happens, not what was asked


@dataclass
class DecoderOnlyConfig:
    """Options of ``apply_adapter(model, "decoder_only", **options)``."""

    train_out: bool = field(default=False, metadata={"help": "train the 1×1×1 `out` head (needed when the class count changes)"})

    def __post_init__(self) -> None:
        _check_bool("train_out", self.train_out)


def apply_full(model: nn.Module, **options) -> dict:
    """Make every parameter trainable; returns the resolved options."""
    config = FullConfig(**options)
    model.requires_grad_(True)
    return options_dict(config)


def apply_decoder_only(model: nn.Module, **options) -> dict:
    """Freeze all but ``decoder2..5`` (and ``out`` with ``train_out``); returns the resolved options."""
    config = DecoderOnlyConfig(**options)
    freeze_for_adapter(model, train_out=config.train_out)
    return options_dict(config)
