"""LoHa through HF peft on the transformer linears of a MONAI UNETR or SwinUNETR (Hyeon-Woo et al., FedPara; LyCORIS).

ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b) (Hadamard product of two rank-r products, so rank(ΔW) ≤ r²); peft
initialises W2b to zero: zero effect at init. Trainable per linear (in → out): 2·r·(in + out).
Default r = 16, alpha = 16 (not in the paper): the same trainable count as LoRA r = 32, so the two compare at equal size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .base import options_dict
from .hf_peft import inject_peft, target_regex
from .lora import LoRAConfig

__all__ = ["LoHaConfig", "apply_loha"]


@dataclass
class LoHaConfig(LoRAConfig):
    """Options of ``apply_adapter(model, "loha", **options)``."""

    rank: int = field(default=16, metadata={"help": "r of each of the two Hadamard factors (default 16: LoRA r=32's size)"})
    alpha: float = field(default=16, metadata={"help": "scaling = alpha / rank"})


def apply_loha(model: nn.Module, **options) -> dict:
    """LoHa (peft) on the ViT linears, decoder trained; returns the resolved options."""
    from peft import LoHaConfig as PeftLoHaConfig

    config = LoHaConfig(**options)
    inject_peft(model, PeftLoHaConfig(r=config.rank, alpha=config.alpha, target_modules=target_regex(model, config.targets)), config.train_out)
    return options_dict(config)
