"""Bad inputs through the real entry point: each stops with exit code 2 and a line naming the file or key and the fix.

Every case runs ``python -m tcurlora_seg.train`` as a user does, on a copy of the toy cohort corrupted one way, and
checks what a user sees and what is left on disk: no traceback, the last stderr line starts with ``error:`` and
names the culprit, the fresh run folder (``hydra.run.dir``) is gone, and every file that existed before (the data,
an earlier run, an unrelated file in outputs/) is byte-identical. The data check's own unit tests are in
tests/data/test_check.py; these are about the entry point's end-to-end behaviour.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_unetr, write_official_dataset
from tests.test_train import tiny_run, train


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    old = nib.load(path)
    nib.save(nib.Nifti1Image(data, old.affine if affine is None else affine), path)


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# Each corruption gets (tmp, dataset root) and returns the overrides of the run; the needle must be in the error.
def missing_root(tmp: Path, root: Path) -> list[str]:
    return [f"data.root={tmp / 'nowhere'}"]


def missing_label(tmp: Path, root: Path) -> list[str]:
    (root / "sub2" / "sub2_mask.nii.gz").unlink()
    return []


def truncated_image(tmp: Path, root: Path) -> list[str]:
    path = root / "sub2" / "sub2_img.nii.gz"
    path.write_bytes(path.read_bytes()[:1000])
    return []


def not_nifti(tmp: Path, root: Path) -> list[str]:
    (root / "sub2" / "sub2_img.nii.gz").write_text("patient,age\nsub2,71\n")
    return []


def four_d_image(tmp: Path, root: Path) -> list[str]:
    path = root / "sub2" / "sub2_img.nii.gz"
    image = _array(path)
    _nifti(path, np.stack([image, image], axis=-1))  # (X, Y, Z, 2): two channels where data.in_channels=1
    return []


def shape_mismatch(tmp: Path, root: Path) -> list[str]:
    path = root / "sub2" / "sub2_mask.nii.gz"
    _nifti(path, _array(path)[:-4])
    return []


def affine_mismatch(tmp: Path, root: Path) -> list[str]:
    path = root / "sub2" / "sub2_mask.nii.gz"
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 5.0  # the label shifted by 5 mm
    _nifti(path, _array(path), affine=affine)
    return []


def label_outside_declared(tmp: Path, root: Path) -> list[str]:
    path = root / "sub2" / "sub2_mask.nii.gz"
    label = _array(path).copy()
    label[0, 0, 0] = 3
    _nifti(path, label)
    return []


def empty_training_label(tmp: Path, root: Path) -> list[str]:
    path = root / "sub2" / "sub2_mask.nii.gz"
    _nifti(path, np.zeros_like(_array(path)))
    return []


def nan_voxels(tmp: Path, root: Path) -> list[str]:
    path = root / "sub2" / "sub2_img.nii.gz"
    image = _array(path).copy()
    image[5, 5, 5] = np.nan
    _nifti(path, image)
    return []


def pretrained_of_another_size(tmp: Path, root: Path) -> list[str]:
    other = make_tiny_unetr(hidden_size=96, num_heads=3, mlp_dim=192)  # our format, a wider ViT than unetr_tiny
    torch.save({"model": other.state_dict(), "config": {"model": {"hidden_size": 96, "mlp_dim": 192}}}, tmp / "wide.pt")
    return [f"model.pretrained={tmp / 'wide.pt'}"]


def pretrained_of_four_channels(tmp: Path, root: Path) -> list[str]:
    torch.save(make_tiny_unetr(in_channels=4).state_dict(), tmp / "brats4.pt")  # BraTS' four modalities
    return [f"model.pretrained={tmp / 'brats4.pt'}"]


def channel_index_out_of_range(tmp: Path, root: Path) -> list[str]:
    return [*pretrained_of_four_channels(tmp, root), "model.pretrained_channels=[4]"]


def bundle_of_another_network(tmp: Path, root: Path) -> list[str]:
    bundle = tmp / "zoo_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text('{"network_def": {"_target_": "BasicUNet", "spatial_dims": 3}}')
    torch.save(make_tiny_unetr().state_dict(), bundle / "models" / "model.pt")
    return [f"model.pretrained={bundle}"]


def overrides(*args: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, root: list(args)


CASES = {
    "missing root": (missing_root, "nowhere"),
    "missing label file": (missing_label, "sub2_mask.nii.gz"),
    "truncated image": (truncated_image, "sub2_img.nii.gz"),
    "not a NIfTI": (not_nifti, "sub2_img.nii.gz"),
    "4-D image": (four_d_image, "sub2_img.nii.gz"),
    "shape mismatch": (shape_mismatch, "sub2_mask.nii.gz"),
    "affine mismatch": (affine_mismatch, "sub2_mask.nii.gz"),
    "label value not declared": (label_outside_declared, "sub2_mask.nii.gz"),
    "empty training label": (empty_training_label, "sub2_mask.nii.gz"),
    "NaN voxels": (nan_voxels, "sub2_img.nii.gz"),
    "unknown key": (overrides("trainer.max_epochz=3"), "max_epochz"),
    "unknown nested key": (overrides("data.augment.flip_probability=0.2"), "flip_probability"),
    "negative rank": (overrides("peft.rank=-1"), "peft.rank"),
    "rank above the ViT width": (overrides("peft.rank=49"), "peft.rank=49"),
    "roi not a multiple of 16": (overrides("data.roi_size=[40,40,40]"), "data.roi_size"),
    "roi of two axes": (overrides("data.roi_size=[32,32]"), "data.roi_size"),
    "pretrained of another size": (pretrained_of_another_size, "wide.pt"),
    "pretrained of four channels": (pretrained_of_four_channels, "model.pretrained_channels"),
    "channel index out of range": (channel_index_out_of_range, "index 4 out of range"),
    "bundle of another network": (bundle_of_another_network, "neither UNETR nor SwinUNETR"),
    "unknown non-finite policy": (overrides("trainer.nonfinite=ignore"), "trainer.nonfinite"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_official_dataset(tmp_path_factory.mktemp("pristine") / "toy", n=5)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def existing_outputs(tmp: Path) -> None:
    """What a user already has: an earlier run folder and an unrelated file; they must stay byte-identical."""
    earlier = tmp / "outputs" / "official" / "tcurlora" / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "config.yaml").write_text("seed: 0\n")
    (earlier / "checkpoints" / "last.pt").write_bytes(b"earlier weights")
    (tmp / "outputs" / "notes.txt").write_text("keep me\n")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_leaves_no_run_folder(tmp_path, pristine, case):
    corrupt, needle = CASES[case]
    root = tmp_path / "toy"
    shutil.copytree(pristine, root)
    existing_outputs(tmp_path)
    args = tiny_run(root, "trainer.max_epochs=1", "trainer.epoch_length=1", *corrupt(tmp_path, root))
    before = snapshot(tmp_path)
    run_dir = tmp_path / "run"
    result = train(tmp_path, *args, f"hydra.run.dir={run_dir}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines and lines[-1].startswith("error:"), result.stderr[-3000:]
    # The data check lists every problem on its own line, then a summary; everything else is a single line.
    errors = [line for line in lines if line.startswith("error:")]
    assert any(needle in line for line in errors), result.stderr[-3000:]
    assert len(errors) == 1 or "problem(s) in data.root" in lines[-1], result.stderr[-3000:]
    assert not run_dir.exists(), sorted(str(p) for p in run_dir.rglob("*"))
    assert snapshot(tmp_path) == before


def test_roi_larger_than_the_images_is_fine(tmp_path, pristine):
    """Not an error: training pads volumes up to the crop, the sliding window pads them up to its window."""
    run_dir = tmp_path / "run"
    result = train(tmp_path, *tiny_run(pristine, "data.roi_size=[48,48,48]", "trainer.max_epochs=1", "trainer.epoch_length=1"),
                   f"hydra.run.dir={run_dir}")  # the images are 40 x 36 x 32
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "best.pt").is_file() and "validation Dice" in result.stdout + result.stderr
