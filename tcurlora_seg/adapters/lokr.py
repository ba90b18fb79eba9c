"""LoKr through HF peft on the transformer linears of a MONAI UNETR or SwinUNETR (LyCORIS' Kronecker adapter).

ΔW = (alpha / r) · W1 ⊗ W2 with out = a·b, in = c·d from peft's ``factorization(dim, factor)`` (``factor`` = -1:
the two factors nearest √dim, e.g. 768 = 24·32, 2304 = 48·48, 3072 = 48·64). W1 (a × c) is full; W2 (b × d) is
full when r ≥ max(b, d) / 2, else W2a (b × r) · W2b (r × d). peft initialises W1 to zero: zero effect at init.
Trainable per linear: a·c + (b·d if r ≥ max(b, d) / 2 else r·(b + d)).
Default r = 8, alpha = 8, factor = -1 (not in the paper; LyCORIS' usual small setting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .base import options_dict
from .hf_peft import inject_peft, target_regex
from .lora import LoRAConfig

__all__ = ["LoKrConfig", "apply_lokr"]


@dataclass
class LoKrConfig(LoRAConfig):
    """Options of ``apply_adapter(model, "lokr", **options)``."""

    rank: int = field(default=8, metadata={"help": "r of the low-rank W2 = W2a W2b (full W2 when r >= max(b, d) / 2)"})
    alpha: float = field(default=8, metadata={"help": "scaling = alpha / rank"})
    factor: int = field(default=-1, metadata={"help": "Kronecker split of each dimension: -1 = near √dim, else this divisor"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or (self.factor < 1 and self.factor != -1):
            raise ValueError(f"peft.factor must be -1 or a positive integer, got {self.factor!r}")


def apply_lokr(model: nn.Module, **options) -> dict:
    """LoKr (peft) on the ViT linears, decoder trained; returns the resolved options."""
    from peft import LoKrConfig as PeftLoKrConfig

    config = LoKrConfig(**options)
    peft_config = PeftLoKrConfig(
        r=config.rank, alpha=config.alpha, decompose_factor=config.factor, target_modules=target_regex(model, config.targets)
    )
    inject_peft(model, peft_config, config.train_out)
    return options_dict(config)
