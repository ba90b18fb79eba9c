"""scripts/recipes.py: every recipe through the real entry points on real-shaped fixtures, one record per step."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

from tests.run_helpers import load_script

recipes = load_script("recipes")


def args_for(tmp_path: Path, **changes) -> argparse.Namespace:
    args = recipes.parse_args(["--model", "unetr_tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_step_records_its_own_peak_rss_exit_code_load_report_and_error(tmp_path: Path) -> None:
    big = recipes.run_step(python(
        "import sys\n"
        "block = bytearray(300 * 2**20)\n"  # 300 MiB, touched
        "print('[2025-01-01 12:00:00,000][tcurlora_seg][INFO] - Loaded 190/194 model tensors from s.pt (official format). 4 missing.')\n"
        "print('error: model.pretrained=s.pt: 1 ViT/encoder tensors do not fit the model', file=sys.stderr)\n"
        "sys.exit(2)\n"), tmp_path / "big.log")
    small = recipes.run_step(python("pass"), tmp_path / "small.log")
    assert big["exit_code"] == 2 and small["exit_code"] == 0
    # the step's own peak, not the largest of every step so far (RUSAGE_CHILDREN would give 300+ for both)
    assert big["peak_rss_mib"] > 290 and small["peak_rss_mib"] < 100
    assert big["load_report"] == ["Loaded 190/194 model tensors from s.pt (official format). 4 missing."]
    assert big["error"] == "error: model.pretrained=s.pt: 1 ViT/encoder tensors do not fit the model"
    assert small["load_report"] == [] and small["error"] is None and big["wall_s"] > 0
    crash = recipes.run_step(python("raise ValueError('bad shape')"), tmp_path / "crash.log")
    assert crash["exit_code"] == 1 and crash["error"] == "ValueError: bad shape"
    slow = recipes.run_step(python("import time; time.sleep(30)"), tmp_path / "slow.log", timeout=1)
    assert slow["exit_code"] == -9 and "timed out" in slow["error"] and slow["wall_s"] < 20


def test_the_source_trains_first_and_a_failed_recipe_is_reported_while_the_others_go_on(tmp_path: Path) -> None:
    calls = []

    def fake_run(command, log, env=None, timeout=None):
        step = log.stem.rsplit("_", 1)[1]
        recipe = log.stem[: -len(step) - 1]
        calls.append((recipe, step, command))
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(recipes.REPO)  # the worktree's package in the steps
        if (recipe, step) == ("msd_hippocampus", "train"):
            return {"command": " ".join(command), "wall_s": 1.0, "peak_rss_mib": 10.0, "exit_code": 2, "load_report": [],
                    "error": "error: position embeddings do not fit"}
        return {"command": " ".join(command), "wall_s": 1.0, "peak_rss_mib": 10.0, "exit_code": 0,
                "load_report": ["Loaded 1/1 model tensors"] if step == "train" else [], "error": None}

    args = args_for(tmp_path, recipes=["msd_brain_tumour", "msd_hippocampus", "brats"])
    report = recipes.run_all(args, tmp_path / "out", run=fake_run)
    order = [(r, s) for r, s, _ in calls]
    assert order == [("brats", s) for s in recipes.STEPS] + [("msd_hippocampus", "train")] + \
        [("msd_brain_tumour", s) for s in recipes.STEPS]
    source = tmp_path / "out" / "runs" / "brats" / "source_unetr.pt"
    train = {r: c for r, s, c in calls if s == "train"}
    assert "+experiment=brats" in train["brats"] and not any(a.startswith("model.pretrained=") for a in train["brats"])
    assert f"model.pretrained={source}" in train["msd_brain_tumour"] and "model=unetr_tiny" in train["msd_brain_tumour"]
    assert not any(a.startswith("data.roi_size") for a in train["brats"])  # --scale 1: each recipe's own roi
    assert {"trainer.max_epochs=1", "data.batch_size=1", "data.num_workers=0", "trainer.val_interval=1"} <= set(train["brats"])
    skipped = [r for r in report["steps"] if r["recipe"] == "msd_hippocampus"]
    assert [r["step"] for r in skipped] == list(recipes.STEPS) and skipped[0]["exit_code"] == 2
    assert all(r["skipped"] == "skipped: train exited 2" for r in skipped[1:])
    saved = json.loads((tmp_path / "out" / "recipes.json").read_text())
    assert saved["complete"] is True and len(saved["steps"]) == 12 and "wait4" in saved["rss_method"]
    table = (tmp_path / "out" / "recipes.md").read_text()
    assert "| msd_hippocampus | train | 2 |" in table and "position embeddings do not fit" in table
    assert "| msd_brain_tumour | train | 0 |" in table and "Loaded 1/1 model tensors" in table


def test_scaled_runs_shrink_each_recipes_own_roi() -> None:
    assert recipes.recipe_roi("msd_hippocampus") == [48, 64, 48] and recipes.recipe_roi("brats") == [128, 128, 128]
    assert recipes.scaled_roi([128, 128, 128], 0.25) == [32, 32, 32]
    assert recipes.scaled_roi([48, 64, 48], 0.25) == [16, 16, 16]
    assert recipes.scaled_roi([48, 64, 48], 0.5) == [32, 32, 32]


@pytest.mark.slow
def test_every_recipe_runs_end_to_end_with_the_tiny_model(tmp_path: Path) -> None:
    """4-8 minutes on 2 cores: 6 recipes x 4 entry-point processes on grids shrunk 4x."""
    args = recipes.parse_args(["--model", "unetr_tiny", "--scale", "0.25", "--cases", "3", "--out", str(tmp_path / "out")])
    report = recipes.run_all(args, tmp_path / "out")
    steps = {(r["recipe"], r["step"]): r for r in report["steps"]}
    assert len(steps) == len(recipes.RECIPES) * len(recipes.STEPS)
    assert (tmp_path / "out" / "runs" / "brats" / "source_unetr.pt").is_file()
    for recipe in recipes.RECIPES:
        train = steps[(recipe, "train")]
        assert all(steps[(recipe, s)]["exit_code"] == 0 for s in recipes.STEPS), recipe
        assert train["peak_rss_mib"] > 100
        if recipe != "brats":
            assert train["load_report"] and train["load_report"][0].startswith("Loaded ")
        if recipe == "msd_hippocampus":  # its 48x64x48 roi (here 16³) from the source's 128³ (here 32³)
            assert "Position embeddings resampled from a 2x2x2 to a 1x1x1 patch grid" in " ".join(train["load_report"])
        assert steps[(recipe, "predict")]["mask_on_input_grid"] is True
        assert (tmp_path / "out" / "bundles" / recipe / "models" / "model.pt").is_file()
