"""The data side on files shaped like the real datasets (scripts/real_shapes.py): BraTS 2021's flipped 240x240x155
grid, MNI152's 182x218x182, MSD's hippocampus crops and Task01's 4-D files. Layouts find the cases, the check passes,
the transforms give the model's channels on the file's grid, data.modality picks a 4-D file's channels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_helpers import compose_data, write_nifti
from tcurlora_seg.data.check import check_dataset
from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.data.transforms import SelectChannelsd, build_transforms
from tcurlora_seg.errors import UserError
from tests.run_helpers import load_script

real_shapes = load_script("real_shapes")
CASES = 3
NAMES = list(real_shapes.SPECS)
# (grid of every case, or None when it varies; roi_size of the data config)
EXPECTED = {
    "brats": ((240, 240, 155), (128, 128, 128)),
    "eadc": ((182, 218, 182), (128, 128, 128)),
    "lpba40": ((182, 218, 182), (128, 128, 128)),
    "upenn_gbm": ((240, 240, 155), (128, 128, 128)),
    "msd_hippocampus": (None, (48, 64, 48)),
    "msd_brain_tumour": ((240, 240, 155), (128, 128, 128)),
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each dataset at its real size, written once for the module, on first use."""
    root = tmp_path_factory.mktemp("real")
    written: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            written[name] = real_shapes.write_dataset(name, root / name, cases=CASES)
            return written[name]

    return Lazy()


def data_config(name: str, root: Path, *overrides: str) -> dict:
    spec = real_shapes.SPECS[name]
    return compose_data(spec.data, [f"data.root={root}", "data.split.train=1", "data.split.val=1", "data.split.test=null",
                                    "data.split.files=null", *overrides])


@pytest.mark.parametrize("name", NAMES)
def test_layouts_find_the_cases_and_the_check_passes(datasets: dict[str, Path], name: str) -> None:
    cfg = data_config(name, datasets[name])
    cases = load_cases(cfg)
    assert [len(cases[s]) for s in ("train", "val", "test")] == [1, 1, CASES - 2]
    for case in (c for split in cases.values() for c in split):
        assert Path(case["image"]).is_file() and Path(case["label"]).is_file()
    result = check_dataset(cfg, cases)
    assert result.problems == [] and result.warnings == []


@pytest.mark.parametrize("name", NAMES)
def test_transforms_give_one_channel_on_the_files_grid_and_roi_crops(datasets: dict[str, Path], name: str) -> None:
    cfg = data_config(name, datasets[name])
    case = load_cases(cfg)["train"][0]
    grid, roi = EXPECTED[name]
    stored = nib.load(case["image"])
    assert grid is None or stored.shape[:3] == grid
    out = build_transforms(cfg, "val")(dict(case))
    assert tuple(out["image"].shape) == (1, *stored.shape[:3]) == tuple(out["label"].shape)
    np.testing.assert_allclose(out["image"].affine.numpy(), stored.affine)  # the file's orientation, kept
    label = out["label"].numpy()
    assert set(np.unique(label)) == {0.0, 1.0}  # label_map: one foreground class, present
    train = build_transforms(cfg, "train")(dict(case))
    assert tuple(train["image"].shape) == (1, *roi) == tuple(train["label"].shape)


def test_msd_hippocampus_crops_vary_and_are_padded_to_the_roi(datasets: dict[str, Path]) -> None:
    cfg = data_config("msd_hippocampus", datasets["msd_hippocampus"])
    shapes = {nib.load(c["image"]).shape for split in load_cases(cfg).values() for c in split}
    assert len(shapes) > 1 and all(30 <= s[0] <= 40 and 45 <= s[1] <= 55 and 30 <= s[2] <= 40 for s in shapes)
    case = load_cases(cfg)["train"][0]
    out = build_transforms(cfg, "train")(dict(case))
    assert tuple(out["image"].shape) == (1, 48, 64, 48)
    # the padded crop holds the whole volume: every foreground voxel of the file survives
    stored = np.asarray(nib.load(case["label"]).dataobj)
    assert float(out["label"].sum()) == float((stored > 0).sum())


def zscore(x: np.ndarray) -> np.ndarray:
    """What NormalizeIntensityd(nonzero=True) does to one channel."""
    out = np.zeros_like(x, dtype=np.float64)
    inside = x != 0
    out[inside] = (x[inside] - x[inside].mean()) / x[inside].std()
    return out


def test_modality_picks_the_t1gd_channel_of_a_4d_file(datasets: dict[str, Path]) -> None:
    root = datasets["msd_brain_tumour"]
    cfg = data_config("msd_brain_tumour", root)
    assert cfg["modality"] == [2] and cfg["in_channels"] == 1
    assert json.loads((root / "dataset.json").read_text())["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    case = load_cases(cfg)["train"][0]
    raw = np.asarray(nib.load(case["image"]).dataobj)
    assert raw.shape == (240, 240, 155, 4)
    label = np.asarray(nib.load(case["label"]).dataobj)
    # the fixture's contrast is what the channel order says: the enhancing rim (3) is brightest in T1gd
    assert int(np.argmax([raw[..., c][label == 3].mean() for c in range(4)])) == 2
    out = build_transforms(cfg, "val")(dict(case))["image"]
    np.testing.assert_allclose(out[0].numpy(), zscore(raw[..., 2]), atol=1e-4)
    assert not np.allclose(out[0].numpy(), zscore(raw[..., 0]), atol=1e-2)  # not FLAIR, the first channel
    # two channels, in the order asked for
    both = build_transforms({**cfg, "modality": [3, 0], "in_channels": 2}, "val")(dict(case))["image"]
    assert both.shape[0] == 2
    np.testing.assert_allclose(both[0].numpy(), zscore(raw[..., 3]), atol=1e-4)
    np.testing.assert_allclose(both[1].numpy(), zscore(raw[..., 0]), atol=1e-4)
    # null: all four, which the check then counts against data.in_channels
    one = {"train": [case], "val": [], "test": []}
    problems = check_dataset({**cfg, "modality": None}, one).problems
    assert len(problems) == 1 and "4 image channel(s) but data.in_channels=1" in problems[0]
    assert check_dataset({**cfg, "modality": None, "in_channels": 4}, one).problems == []


def test_modality_out_of_range_is_one_line_naming_data_modality(datasets: dict[str, Path], tmp_path: Path) -> None:
    cfg = data_config("msd_brain_tumour", datasets["msd_brain_tumour"])
    with pytest.raises(UserError, match=r"data.modality=\[4\].*0 FLAIR, 1 T1w, 2 t1gd, 3 T2w") as info:
        load_cases({**cfg, "modality": [4]})
    assert "\n" not in str(info.value)
    # a file with fewer channels than dataset.json names: the check says which file and which key
    root = tmp_path / "Task01"
    write_nifti(root / "imagesTr" / "BRATS_001.nii.gz", np.ones((6, 7, 5, 2), np.float32))
    write_nifti(root / "labelsTr" / "BRATS_001.nii.gz", np.ones((6, 7, 5), np.uint8))
    (root / "dataset.json").write_text(json.dumps({"modality": real_shapes.MSD_MODALITIES, "training": [
        {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]}))
    small = {**cfg, "root": str(root), "split": {**cfg["split"], "train": 1, "val": 0, "test": 0}}
    problems = check_dataset(small, load_cases(small)).problems
    assert len(problems) == 1 and "BRATS_001.nii.gz: 2 channel(s) in its 4th axis" in problems[0]
    assert "data.modality=[2]" in problems[0] and "\n" not in problems[0]
    with pytest.raises(Exception) as wrapped:  # the transform says the same when the check was skipped
        build_transforms(small, "val")(dict(load_cases(small)["train"][0]))
    from tcurlora_seg.data.transforms import user_error_of

    assert "data.modality=[2]" in str(user_error_of(wrapped.value))


def test_per_channel_files_stacked_by_the_loader_are_not_picked_again(tmp_path: Path) -> None:
    """nnU-Net's _0000/_0001 files: the layout picks the files, the transform leaves their stack alone."""
    paths = [str(write_nifti(tmp_path / f"c_{i:04d}.nii.gz", np.full((6, 7, 5), i + 1.0, np.float32))) for i in range(2)]
    from monai.transforms import LoadImaged

    stacked = LoadImaged(keys="image", image_only=True)({"image": paths})
    assert tuple(SelectChannelsd("image", [1])(stacked)["image"].shape) == (2, 6, 7, 5)
    four_d = LoadImaged(keys="image", image_only=True)({"image": str(write_nifti(tmp_path / "f.nii.gz", np.stack(
        [np.full((6, 7, 5), c, np.float32) for c in range(3)], axis=-1)))})
    picked = SelectChannelsd("image", [1])(four_d)["image"]
    assert tuple(picked.shape) == (6, 7, 5, 1) and torch.all(picked == 1)


def test_brats_orientation_is_kept_and_reorienting_moves_image_and_label_together(datasets: dict[str, Path]) -> None:
    cfg = data_config("brats", datasets["brats"])
    case = load_cases(cfg)["train"][0]
    stored = nib.load(case["label"])
    assert nib.aff2axcodes(stored.affine) == ("L", "P", "S")
    kept = build_transforms(cfg, "val")(dict(case))
    np.testing.assert_array_equal(kept["label"][0].numpy(), (np.asarray(stored.dataobj) > 0).astype(np.float32))
    ras = build_transforms({**cfg, "orientation": "RAS"}, "val")(dict(case))
    assert nib.aff2axcodes(ras["label"].affine.numpy()) == ("R", "A", "S")
    # RAS flips BraTS' first two axes: the same voxels, in the image and in the label
    np.testing.assert_array_equal(ras["label"][0].numpy(), kept["label"][0].numpy()[::-1, ::-1])
    np.testing.assert_allclose(ras["image"][0].numpy(), kept["image"][0].numpy()[::-1, ::-1], atol=1e-5)  # z-score sums in another order
