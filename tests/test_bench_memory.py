"""scripts/bench_memory.py: peak memory of a training step and of a sliding-window evaluation, each in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.run_helpers import REPO


def test_tiny_setting_measures_each_stage_in_its_own_process(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_memory.py"), "--model", "unetr_tiny", "--crop", "32",
                           "--shape", "48", "40", "36", "--out", str(out),
                           "--measurements", "train_step", "sliding_window"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    results = {r["measurement"]: r for r in report["results"]}
    assert list(results) == ["train_step", "sliding_window"]  # baseline: the same process without the step
    assert all(r["exit_code"] == 0 and r["peak_rss_mib"] > 100 for r in results.values())
    # the step's activations, gradients and Adam's state come on top of the built model and batch
    assert results["train_step"]["peak_rss_mib"] > results["train_step"]["rss_before_step_mib"] > 100
    assert results["train_step"]["trainable"] < results["train_step"]["parameters"]  # tCURLoRA: the ViT is frozen
    window = results["sliding_window"]
    assert window["mask_shape"] == [48, 40, 36] and window["windows_roi"] == [32, 32, 32] and window["overlap"] == 0.5
    assert report["settings"]["model"] == "unetr_tiny" and "ru_maxrss" in report["method"]
    assert "sliding_window" in proc.stdout and "MiB" in proc.stdout
