from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR

# The tiny UNETR of the test suite (DESIGN: hidden 48, 3 heads, mlp 96, feature size 8, 32³); 12 blocks as always.
TINY = dict(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=3)


def make_tiny_unetr(seed: int = 0, **overrides) -> UNETR:
    """A deterministic tiny UNETR standing in for a pretrained source model."""
    torch.manual_seed(seed)
    return UNETR(**{**TINY, **overrides})


@pytest.fixture
def tiny_unetr() -> UNETR:
    return make_tiny_unetr()


@pytest.fixture
def volume() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, 32, 32, 32)
