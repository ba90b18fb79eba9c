from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import compose_data, write_nifti
from tcurlora_seg.data.transforms import build_transforms, label_mapping
from tcurlora_seg.errors import UserError

SHAPE = (8, 10, 6)


def _case(tmp_path: Path, image: np.ndarray, label: np.ndarray, affine: np.ndarray | None = None) -> dict:
    return {
        "image": str(write_nifti(tmp_path / "img.nii.gz", image.astype(np.float32), affine)),
        "label": str(write_nifti(tmp_path / "mask.nii.gz", label.astype(np.uint8), affine)),
        "id": "c",
    }


def _marker_case(tmp_path: Path) -> dict:
    """Positive image with one bright voxel at an asymmetric spot; the label marks exactly that voxel."""
    rng = np.random.default_rng(0)
    image = rng.uniform(1.0, 2.0, size=SHAPE)
    label = np.zeros(SHAPE)
    image[1, 7, 4] = 10.0
    label[1, 7, 4] = 1
    return _case(tmp_path, image, label)


def _cfg(**aug: float | str) -> dict:
    cfg = compose_data("official", ["data.roi_size=[8,10,6]"])
    cfg["augment"].update(aug)
    return cfg


def test_flip_moves_image_and_label_together(tmp_path: Path) -> None:
    case = _marker_case(tmp_path)
    ref = build_transforms(_cfg(), "val")(case)
    out = build_transforms(_cfg(flip_prob=1.0, intensity_prob=0.0), "train")(dict(case))
    assert torch.equal(out["label"], torch.flip(ref["label"], dims=(1, 2, 3)))
    assert torch.allclose(out["image"], torch.flip(ref["image"], dims=(1, 2, 3)))


def test_random_augmentation_keeps_image_and_label_aligned(tmp_path: Path) -> None:
    case = _marker_case(tmp_path)
    chain = build_transforms(_cfg(), "train")
    positions = set()
    for seed in range(12):
        chain.set_random_state(seed=seed)
        out = chain(dict(case))
        img_pos = np.unravel_index(int(out["image"].argmax()), out["image"].shape)
        lab_pos = np.unravel_index(int(out["label"].argmax()), out["label"].shape)
        assert img_pos == lab_pos and float(out["label"].sum()) == 1.0
        positions.add(img_pos)
    assert len(positions) > 1  # flips did happen


def test_train_crops_to_roi_and_val_keeps_the_whole_volume_with_metadata(tmp_path: Path) -> None:
    case = _marker_case(tmp_path)
    cfg = _cfg()
    cfg["roi_size"] = [4, 4, 4]
    train = build_transforms(cfg, "train")(dict(case))
    assert tuple(train["image"].shape) == (1, 4, 4, 4) == tuple(train["label"].shape)
    for split in ("val", "test"):
        out = build_transforms(cfg, split)(dict(case))
        assert tuple(out["image"].shape) == (1, *SHAPE)
        assert out["image"].affine.shape == (4, 4) and "pixdim" in out["image"].meta
        assert str(out["image"].meta["filename_or_obj"]).endswith("img.nii.gz")


def test_small_volumes_are_padded_to_the_roi(tmp_path: Path) -> None:
    cfg = _cfg()
    cfg["roi_size"] = [16, 16, 16]
    out = build_transforms(cfg, "train")(dict(_marker_case(tmp_path)))
    assert tuple(out["image"].shape) == (1, 16, 16, 16)


def test_zscore_over_nonzero_voxels_keeps_background_zero(tmp_path: Path) -> None:
    image = np.zeros(SHAPE)
    image[2:6, 2:8, 1:5] = np.random.default_rng(1).uniform(100, 300, size=(4, 6, 4))
    out = build_transforms(_cfg(), "val")(_case(tmp_path, image, np.zeros(SHAPE)))["image"][0]
    fg = torch.from_numpy(image != 0)
    assert torch.all(out[~fg] == 0)
    assert abs(float(out[fg].mean())) < 1e-4 and abs(float(out[fg].std(unbiased=False)) - 1) < 1e-3


def test_label_map_keeps_selected_structures_only(tmp_path: Path) -> None:
    # LPBA40-like: 56 structures, keep the hippocampi 165 and 166
    label = np.zeros(SHAPE)
    label[0:2] = 21
    label[2:4] = 165
    label[4:6] = 166
    label[6:8] = 181
    cfg = compose_data("lpba40")
    out = build_transforms(cfg, "val")(_case(tmp_path, np.ones(SHAPE), label))["label"][0].numpy()
    assert np.array_equal(out, np.isin(label, [165, 166]).astype(np.float32))


def test_brats_label_map_gives_whole_tumour(tmp_path: Path) -> None:
    label = np.zeros(SHAPE)
    label[0, 0, 0], label[1, 1, 1], label[2, 2, 2] = 1, 2, 4
    out = build_transforms(compose_data("brats2021"), "val")(_case(tmp_path, np.ones(SHAPE), label))["label"][0].numpy()
    assert np.array_equal(out, (label > 0).astype(np.float32))


def test_label_map_needs_declared_labels() -> None:
    with pytest.raises(UserError, match="data.labels"):
        label_mapping({"labels": [0, 1], "label_map": {2: 1}})
    with pytest.raises(UserError, match="data.labels"):
        label_mapping({"labels": None, "label_map": {1: 1}})
    assert label_mapping({"labels": [0, 1, 2], "label_map": {2: 1}}) == ([0.0, 1.0, 2.0], [0.0, 0.0, 1.0])


def test_orientation_and_spacing_resample_both_keys(tmp_path: Path) -> None:
    # stored LAS at 1 mm: RAS + 2 mm flips the first axis and halves the grid, label stays binary and aligned
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    image = np.ones(SHAPE)
    label = np.zeros(SHAPE)
    label[0:2, 0:2, 0:2] = 1
    image[0:2, 0:2, 0:2] = 5
    cfg = {**_cfg(), "orientation": "RAS", "spacing": [2.0, 2.0, 2.0]}
    out = build_transforms(cfg, "val")(_case(tmp_path, image, label, affine))
    assert out["image"].shape == out["label"].shape and out["image"].shape[1] == 4
    assert np.allclose(np.diag(out["image"].affine.numpy())[:3], [2, 2, 2])
    assert set(np.unique(out["label"].numpy())) <= {0.0, 1.0}
    # the marked corner moved to the other end of axis 0, in both keys
    assert out["label"][0, -1, 0, 0] == 1 and out["label"][0, 0, 0, 0] == 0
    assert out["image"][0, -1, 0, 0] > out["image"][0, 0, 0, 0]


def test_pos_neg_crop_centres_on_foreground(tmp_path: Path) -> None:
    cfg = _cfg(crop="pos_neg", pos=1.0, neg=0.0)
    cfg["roi_size"] = [2, 2, 2]
    chain = build_transforms(cfg, "train")
    for seed in range(5):
        chain.set_random_state(seed=seed)
        out = chain(dict(_marker_case(tmp_path)))
        out = out[0] if isinstance(out, list) else out
        assert float(out["label"].sum()) == 1.0
    with pytest.raises(UserError, match="data.augment.crop"):
        build_transforms(_cfg(crop="center"), "train")
