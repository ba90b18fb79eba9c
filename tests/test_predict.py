"""Segmenting new scans: `python -m tcurlora_seg.predict` and ``engine.predict``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tcurlora_seg.engine.predict import list_inputs, output_name, predict
from tcurlora_seg.errors import UserError
from tests.run_helpers import AFFINE, make_dataset, make_run, one_thread, write_scan
from tests.test_evaluate import assert_one_line_error, run_in_process, run_module

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    return make_run(root / "run", make_dataset(root / "ds", {"train": [1], "test": [2]}), epochs=())


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    """A folder of two scans on different grids, and a file that is not a scan."""
    folder = tmp_path / "scans"
    write_scan(folder / "a", seed=5)
    write_scan(folder / "b", seed=6, shape=(30, 26, 18), affine=np.diag([1.5, 1.5, 2.0, 1.0]))
    for mask in folder.glob("*_mask.nii.gz"):
        mask.unlink()
    (folder / "notes.txt").write_text("not a scan\n")
    return folder


def test_predict_entry_point_writes_a_mask_per_scan_of_a_folder(
    run: Path, scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "masks"
    overrides = [f"run_dir={run}", f"input={scans}", f"output={out}", "progress=false", "device=cpu"]
    run_in_process("tcurlora_seg.predict", *overrides, cwd=tmp_path, monkeypatch=monkeypatch)
    assert "2 mask(s) written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a_img_seg.nii.gz", "b_img_seg.nii.gz"]
    for name in ("a", "b"):
        image, mask = nib.load(scans / f"{name}_img.nii.gz"), nib.load(out / f"{name}_img_seg.nii.gz")
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert mask.get_data_dtype() == np.uint8


def test_predict_one_file_keeps_its_name_with_empty_suffix(run: Path, scans: Path, tmp_path: Path) -> None:
    written = predict(run, scans / "a_img.nii.gz", tmp_path / "out", suffix="", min_component_mm3=1000, progress=False, device="cpu")
    assert [p.name for p in written] == ["a_img.nii.gz"]
    assert np.allclose(nib.load(written[0]).affine, AFFINE)


def test_predict_refuses_bad_inputs(scans: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        list_inputs(tmp_path / "missing.nii.gz", tmp_path / "out")
    with pytest.raises(UserError, match="not a NIfTI"):
        list_inputs(scans / "notes.txt", tmp_path / "out")
    with pytest.raises(UserError, match="input's folder"):
        list_inputs(scans, scans)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .nii"):
        list_inputs(tmp_path / "empty", tmp_path / "out")
    (scans / "broken.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot be read as NIfTI"):
        list_inputs(scans, tmp_path / "out")
    assert output_name(Path("x/sub1.nii")) == "sub1_seg.nii.gz"


def test_missing_input_exits_2_with_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_module("tcurlora_seg.predict", "output=masks", cwd=tmp_path), "input")
