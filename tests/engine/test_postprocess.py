"""Removal of small connected components by physical volume (paper: components < 1 cm³)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcurlora_seg.engine.postprocess import remove_small_components
from tcurlora_seg.errors import UserError

SPACING = (1.0, 1.0, 2.0)  # anisotropic: one voxel is 2 mm³


def test_components_are_removed_by_volume_in_mm3_not_voxels():
    mask = np.zeros((40, 40, 20), dtype=np.uint8)
    mask[0:9, 0:10, 0:5] = 1  # 450 voxels = 900 mm³: removed
    mask[20:31, 0:10, 0:5] = 1  # 550 voxels = 1100 mm³: kept
    mask[0:10, 20:30, 10:15] = 1  # 500 voxels = 1000 mm³ exactly: kept (only smaller ones go)
    out = remove_small_components(mask, SPACING, 1000.0)
    assert out[0:9, 0:10, 0:5].sum() == 0
    assert (out[20:31, 0:10, 0:5] == 1).all()
    assert (out[0:10, 20:30, 10:15] == 1).all()
    assert out.sum() == 1050 and out.dtype == np.uint8
    # with isotropic 1 mm voxels the same 550-voxel component is 550 mm³ and goes
    assert remove_small_components(mask, (1.0, 1.0, 1.0), 1000.0).sum() == 0


def test_each_foreground_class_is_judged_on_its_own():
    mask = np.zeros((30, 30, 10), dtype=np.int64)
    mask[0:9, 0:10, 0:5] = 1  # class 1: 900 mm³
    mask[9:20, 0:10, 0:5] = 2  # class 2 touching it: 1100 mm³; together they would be 2000 mm³
    out = remove_small_components(mask, SPACING, 1000.0)
    assert (out == 1).sum() == 0
    assert (out == 2).sum() == 550


def test_connectivity_decides_what_a_component_is():
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[0:6, 0:10, 0:5] = 1  # 300 voxels, 600 mm³
    mask[6:12, 10:20, 5:10] = 1  # 600 mm³, touching the first one only at a corner
    assert remove_small_components(mask, SPACING, 1000.0, connectivity=1).sum() == 0
    assert remove_small_components(mask, SPACING, 1000.0, connectivity=3).sum() == 600


def test_torch_input_gives_torch_output():
    mask = torch.zeros(20, 20, 10, dtype=torch.int64)
    mask[0:11, 0:10, 0:5] = 1
    out = remove_small_components(mask, SPACING, 1000.0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64 and int(out.sum()) == 550


def test_bad_spacing_is_a_user_error():
    with pytest.raises(UserError, match="spacing"):
        remove_small_components(np.zeros((4, 4, 4), dtype=np.uint8), (1.0, 0.0, 1.0))
    with pytest.raises(UserError, match="spacing"):
        remove_small_components(np.zeros((4, 4, 4), dtype=np.uint8), (1.0, 1.0))
