from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_helpers import compose_data, make_official, write_nifti
from tcurlora_seg.data.check import check_dataset, run_check
from tcurlora_seg.data.layouts import load_cases

REPO = Path(__file__).resolve().parents[2]


def _setup(tmp_path: Path) -> tuple[dict, dict]:
    root = make_official(tmp_path / "ds", 4, {"train": [1, 2], "val": [3], "test": [4]})
    cfg = compose_data("official", [f"data.root={root}"])
    return cfg, load_cases(cfg)


def _problems(cfg: dict, cases: dict) -> list[str]:
    return check_dataset(cfg, cases).problems


def test_clean_dataset_passes(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    result = check_dataset(cfg, cases)
    assert result.ok and result.problems == [] and result.warnings == []


def test_missing_file(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    Path(cases["train"][0]["label"]).unlink()
    assert _problems(cfg, cases) == [f"{cases['train'][0]['label']}: file not found"]


def test_unreadable_file(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    Path(cases["val"][0]["image"]).write_bytes(b"not a nifti")
    (problem,) = _problems(cfg, cases)
    assert problem.startswith(f"{cases['val'][0]['image']}: cannot be read as NIfTI")


def test_shape_mismatch(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    write_nifti(Path(cases["train"][1]["label"]), np.ones((6, 7, 4), dtype=np.uint8))
    (problem,) = _problems(cfg, cases)
    assert problem.startswith(cases["train"][1]["label"]) and "shape (6, 7, 4) differs from image" in problem


def test_affine_mismatch_beyond_tolerance(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    label = np.zeros((6, 7, 5), dtype=np.uint8)
    label[2, 2, 2] = 1
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    write_nifti(Path(cases["train"][0]["label"]), label, shifted)
    (problem,) = _problems(cfg, cases)
    assert "affine differs" in problem and "data.affine_tol" in problem
    assert _problems({**cfg, "affine_tol": 1.0}, cases) == []


def test_label_values_outside_the_declared_set(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    label = np.zeros((6, 7, 5), dtype=np.uint8)
    label[2, 2, 2], label[3, 3, 3] = 1, 3
    write_nifti(Path(cases["test"][0]["label"]), label)
    (problem,) = _problems(cfg, cases)
    assert problem.startswith(cases["test"][0]["label"]) and "label value(s) 3 not in data.labels [0, 1]" in problem


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_image(tmp_path: Path, bad: float) -> None:
    cfg, cases = _setup(tmp_path)
    image = np.ones((6, 7, 5), dtype=np.float32)
    image[1, 1, 1] = bad
    write_nifti(Path(cases["train"][0]["image"]), image)
    assert _problems(cfg, cases) == [f"{cases['train'][0]['image']}: 1 NaN/Inf voxel(s); fix or re-export the file"]


def test_empty_label_is_a_problem_for_training_and_a_warning_for_test(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    empty = np.zeros((6, 7, 5), dtype=np.uint8)
    write_nifti(Path(cases["train"][0]["label"]), empty)
    write_nifti(Path(cases["test"][0]["label"]), empty)
    result = check_dataset(cfg, cases)
    assert len(result.problems) == 1 and "empty label" in result.problems[0] and "training case sub1" in result.problems[0]
    assert len(result.warnings) == 1 and "test case sub4" in result.warnings[0]


def test_empty_after_label_map_counts_as_empty(tmp_path: Path) -> None:
    # an LPBA40 case whose only structure is not a hippocampus label has no foreground once mapped
    cfg, cases = _setup(tmp_path)
    cfg = {**cfg, "labels": [0, 1, 165], "label_map": {165: 1}}
    problems = _problems(cfg, cases)
    assert len(problems) == 2 and all("empty label" in p for p in problems)  # the two training cases


def test_channel_count_and_overlapping_splits(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    problems = _problems({**cfg, "in_channels": 4}, cases)
    assert len(problems) == 4 and all("data.in_channels=4" in p for p in problems)
    cases["test"].append(dict(cases["train"][0]))
    assert any("in both train and test" in p for p in _problems(cfg, cases))


def test_all_problems_are_collected_and_exit_code_is_2(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    Path(cases["train"][0]["image"]).unlink()
    write_nifti(Path(cases["val"][0]["label"]), np.full((6, 7, 5), 7, dtype=np.uint8))
    Path(cases["test"][0]["label"]).write_bytes(b"garbage")
    out = io.StringIO()
    assert run_check(cfg, cases, stream=out) == 2
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "file not found" in lines[0] and "not in data.labels" in lines[1] and "cannot be read" in lines[2]
    assert lines[3].startswith("error: 3 problem(s)")


def test_ok_run_prints_one_line_and_writes_the_split(tmp_path: Path) -> None:
    cfg, cases = _setup(tmp_path)
    out = io.StringIO()
    assert run_check(cfg, None, run_dir=tmp_path / "run", stream=out) == 0
    assert out.getvalue().splitlines() == [f"data OK: official at {cfg['root']}: train 2 / val 1 / test 1 cases, 0 warning(s)"]
    assert (tmp_path / "run" / "split.json").is_file()


def _cli(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tcurlora_seg.data.check", *overrides], cwd=REPO, capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_exit_codes(tmp_path: Path) -> None:
    root = make_official(tmp_path / "ds", 3, {"train": [1], "val": [2], "test": [3]})
    write_nifti(root / "sub2" / "sub2_mask.nii.gz", np.ones((6, 7, 4), dtype=np.uint8))
    (root / "sub3" / "sub3_img.nii.gz").unlink()
    bad = _cli("data=official", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run1'}")
    assert bad.returncode == 2, bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and "sub2_mask.nii.gz: shape" in errors[0] and "sub3_img.nii.gz: file not found" in errors[1]
    missing = _cli("data=eadc", f"data.root={tmp_path / 'absent'}", f"hydra.run.dir={tmp_path / 'run2'}")
    assert missing.returncode == 2 and "data/README.md" in missing.stderr
    write_nifti(root / "sub2" / "sub2_mask.nii.gz", np.ones((6, 7, 5), dtype=np.uint8))
    make_official(tmp_path / "ds", 3)
    good = _cli("data=official", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run3'}")
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().startswith("data OK: official") and (tmp_path / "run3" / "split.json").is_file()
