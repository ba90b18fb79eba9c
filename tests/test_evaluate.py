"""The `python -m tcurlora_seg.evaluate` entry point: Hydra config, one-line errors with exit code 2, no stray files.

Error paths run as real subprocesses; the success path runs in-process (importing MONAI again costs seconds).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import REPO, make_dataset, make_run, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


def run_module(module: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def run_in_process(module: str, *overrides: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``python -m module overrides...`` does, in this process (as ``__main__``, so Hydra finds ../configs)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [module, *overrides])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    runpy.run_module(module, run_name="__main__", alter_sys=False)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and all(w in lines[0] for w in words), lines[0]


def test_bad_run_dir_exits_2_with_one_line_and_no_stray_files(tmp_path: Path) -> None:
    proc = run_module("tcurlora_seg.evaluate", f"run_dir={tmp_path / 'nope'}", cwd=tmp_path)
    assert_one_line_error(proc, "run_dir=", "config.yaml")
    assert list(tmp_path.iterdir()) == []  # no Hydra output folder, .hydra/ or log file


def test_unknown_key_exits_2_with_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_module("tcurlora_seg.evaluate", "no_such_key=1", cwd=tmp_path), "no_such_key")


def test_entry_point_evaluates_the_run_and_prints_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    data = make_dataset(tmp_path / "ds", {"train": [1], "test": [2]})
    run = make_run(tmp_path / "run", data)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    overrides = [f"run_dir={run}", "progress=false", "device=cpu", "average_last=2", "min_component_mm3=1000"]
    run_in_process("tcurlora_seg.evaluate", *overrides, cwd=cwd, monkeypatch=monkeypatch)
    assert "| foreground mean | 1 |" in capsys.readouterr().out
    summary = (run / "eval" / "summary.json").read_text()
    assert '"average_last": 2' in summary and '"min_component_mm3": 1000.0' in summary
    assert (run / "eval" / "predictions" / "sub2.nii.gz").is_file()
    for picture in ("overlays.png", "dice_per_case.png"):
        assert (run / "eval" / picture).read_bytes().startswith(b"\x89PNG")
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("override", ["overlap=abc", "average_last=3", "checkpoint=epoch_0042", "device=tpu"])
def test_bad_values_exit_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, override: str
) -> None:
    data = make_dataset(tmp_path / "ds", {"train": [1], "test": [2]})
    run = make_run(tmp_path / "run", data)
    with pytest.raises(SystemExit) as exit_info:
        run_in_process("tcurlora_seg.evaluate", f"run_dir={run}", override, cwd=tmp_path, monkeypatch=monkeypatch)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and override.split("=")[0] in lines[0], lines
