"""predict and evaluate on files shaped like the real datasets (scripts/real_shapes.py): MSD hippocampus crops smaller
than the 48x64x48 window, BraTS' flipped axes, MSD Task01's 4-D files. Masks come back on each input's own grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tcurlora_seg.engine.evaluate import evaluate_run
from tcurlora_seg.engine.predict import predict
from tcurlora_seg.errors import UserError
from tests.run_helpers import load_script, make_run, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
real_shapes = load_script("real_shapes")
SPLIT = ["data.split.train=1", "data.split.val=1", "data.split.test=null", "data.split.files=null"]


def fabricated_run(root: Path, name: str, roi: tuple[int, ...], overrides: tuple[str, ...] = (), scale: float = 1.0,
                   run: str = "run") -> tuple[Path, Path]:
    """(run folder with random adapter weights on the tiny UNETR, dataset) for fixture ``name``."""
    data = root / name
    if not data.is_dir():
        real_shapes.write_dataset(name, data, cases=3, scale=scale)
    spec = real_shapes.SPECS[name]
    return make_run(root / run, data, [*SPLIT, *overrides], epochs=(), data=spec.data, roi_size=roi), data


def assert_on_input_grid(mask_path: Path, image_path: str | Path) -> np.ndarray:
    mask, image = nib.load(mask_path), nib.load(image_path)
    assert mask.shape == image.shape[:3] and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, image.affine)
    return np.asarray(mask.dataobj)


def test_msd_hippocampus_volumes_smaller_than_the_window_are_predicted_on_their_own_grid(tmp_path: Path) -> None:
    run, data = fabricated_run(tmp_path, "msd_hippocampus", (48, 64, 48))
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    assert len({nib.load(p).shape for p in images}) > 1  # every crop its own size, each under the window
    written = predict(run, data / "imagesTr", tmp_path / "masks", device="cpu", progress=False)
    for mask, image in zip(sorted(written), images):
        assert_on_input_grid(mask, image)
    summary = evaluate_run(run, device="cpu", progress=False, figures=True)
    assert summary["evaluation"]["n_cases"] == 1 and summary["evaluation"]["roi_size"] == [48, 64, 48]
    assert np.isfinite(summary["foreground_mean"]["Dice"])
    case = next((run / "eval" / "predictions").iterdir())
    assert_on_input_grid(case, data / "labelsTr" / case.name)


def test_brats_masks_keep_the_files_orientation(tmp_path: Path) -> None:
    """A run that reorients to RAS gives, on BraTS' LPS-like file, the mask that a run without reorientation gives
    on the same voxels stored RAS, flipped back: the mask is inverted onto the file's own axes."""
    plain, data = fabricated_run(tmp_path, "brats", (32, 32, 32), scale=0.25)
    ras, _ = fabricated_run(tmp_path, "brats", (32, 32, 32), ("data.orientation=RAS",), run="ras")
    case = sorted(data.iterdir())[0]
    image = case / f"{case.name}_t1ce.nii.gz"
    stored = nib.load(image)
    assert nib.aff2axcodes(stored.affine) == ("L", "P", "S") and stored.shape == (60, 60, 39)
    flipped = tmp_path / "ras_input" / "scan.nii.gz"
    flipped.parent.mkdir()
    to_ras = nib.orientations.ornt_transform(nib.io_orientation(stored.affine), nib.orientations.axcodes2ornt("RAS"))
    nib.save(stored.as_reoriented(to_ras), flipped)
    ours = assert_on_input_grid(predict(ras, image, tmp_path / "a", device="cpu", progress=False)[0], image)
    reference = assert_on_input_grid(predict(plain, flipped, tmp_path / "b", device="cpu", progress=False)[0], flipped)
    assert ours.any()  # not two empty masks agreeing
    np.testing.assert_array_equal(ours, reference[::-1, ::-1])


def test_task01_4d_files_give_3d_masks_from_the_t1gd_channel(tmp_path: Path) -> None:
    run, data = fabricated_run(tmp_path, "msd_brain_tumour", (32, 32, 32), scale=0.25)
    image = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    stored = nib.load(image)
    assert stored.shape == (60, 60, 39, 4)
    mask = assert_on_input_grid(predict(run, image, tmp_path / "masks", device="cpu", progress=False)[0], image)
    # the same run on the T1gd channel stored alone (a 3-D file passes data.modality untouched): the same mask
    t1gd = tmp_path / "t1gd" / "scan.nii.gz"
    t1gd.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(stored.dataobj)[..., 2], stored.affine), t1gd)
    alone = np.asarray(nib.load(predict(run, t1gd, tmp_path / "alone", device="cpu", progress=False)[0]).dataobj)
    assert mask.any()
    np.testing.assert_array_equal(mask, alone)
    flair = tmp_path / "flair" / "scan.nii.gz"  # and not the mask of the first channel
    flair.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(stored.dataobj)[..., 0], stored.affine), flair)
    first = np.asarray(nib.load(predict(run, flair, tmp_path / "first", device="cpu", progress=False)[0]).dataobj)
    assert not np.array_equal(mask, first)
    summary = evaluate_run(run, device="cpu", progress=False)
    assert summary["evaluation"]["n_cases"] == 1 and (run / "eval" / "overlays.png").is_file()


def test_a_4d_file_without_the_picked_channel_is_one_line_naming_data_modality(tmp_path: Path) -> None:
    run, _ = fabricated_run(tmp_path, "msd_brain_tumour", (32, 32, 32), scale=0.25)
    two = tmp_path / "scans" / "two.nii.gz"
    two.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ones((30, 40, 30, 2), np.float32), np.eye(4)), two)
    with pytest.raises(UserError, match=r"two.nii.gz: 2 channel\(s\) in its 4th axis, but data.modality=\[2\]") as info:
        predict(run, two, tmp_path / "masks", device="cpu", progress=False)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_brats_at_full_size_is_predicted_on_its_own_grid(tmp_path: Path) -> None:
    """240x240x155 with the 128³ window of the recipes (tiny model: the grid, not the network, is under test)."""
    run, data = fabricated_run(tmp_path, "brats", (128, 128, 128))
    case = sorted(data.iterdir())[0]
    image = case / f"{case.name}_t1ce.nii.gz"
    assert nib.load(image).shape == (240, 240, 155)
    assert_on_input_grid(predict(run, image, tmp_path / "masks", device="cpu", progress=False)[0], image)
