"""scripts/bench_adapters.py: the report it writes, also when the run is cut off part-way."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_adapters.py"


def args_for(out: Path, methods: list[str]) -> argparse.Namespace:
    return argparse.Namespace(model="unetr", crop=32, batch=1, device="cpu", precision="fp32", rank=2, steps=1, warmup=0, rounds=1,
                              methods=methods, no_inference=True, subprocess=False, out=out)


def test_report_is_written_after_every_method_so_a_cut_off_run_keeps_them(tmp_path, monkeypatch):
    bench = load_script("bench_adapters")
    out = tmp_path / "bench.json"
    timings = {"decoder_only": 1.0, "floor": 1.25}

    def fake_worker(args, method):
        if method not in timings:
            raise KeyboardInterrupt  # the time limit strikes during the third method
        return {"method": method, "step_s": timings[method], "step_min_s": timings[method], "trainable": 1, "peak_mb": 100.0}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    with pytest.raises(KeyboardInterrupt):
        bench.run_all(args_for(out, ["decoder_only", "floor", "lora"]), out)
    report = json.loads(out.read_text())
    assert report["complete"] is False and [r["method"] for r in report["results"]] == ["decoder_only", "floor"]
    assert report["results"][1]["vs_decoder_only"] == pytest.approx(1.25) and not list(tmp_path.glob("*.tmp"))


def test_bench_measures_each_method_on_the_paper_unetr(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--methods", "decoder_only", "tcurlora-auto", "--crop", "32",
                             "--steps", "1", "--warmup", "0", "--rounds", "1", "--no-inference", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert report["complete"] is True and set(rows) == {"decoder_only", "tcurlora-auto"}
    # tCURLoRA trains its cores on top of decoder-only's parameters: 3 tensors x r^2 x n3 (r=8, 48 + 12 + 12 slices)
    assert rows["tcurlora-auto"]["trainable"] - rows["decoder_only"]["trainable"] == 8 * 8 * (48 + 12 + 12)
    assert all(r["step_s"] > 0 and r["peak_mb"] > 0 for r in rows.values())
    assert "| tcurlora-auto |" in result.stdout


@pytest.mark.slow  # a 62 M-parameter network at 64³: about 1.5 min on 2 cores; run with -m slow
def test_bench_measures_swin_unetr_with_its_own_floor(tmp_path):
    """--model swin_unetr: MONAI's Swin UNETR (feature 48); the floor trains the patch embedding on top of
    decoder-only, tCURLoRA its 3 tensors per stage, r² · 6 · Σ depths = 8² · 6 · 8 cores."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", "swin_unetr", "--methods", "floor", "tcurlora-auto",
                             "--crop", "64", "--steps", "1", "--warmup", "0", "--rounds", "1", "--no-inference",
                             "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert report["settings"]["model"] == "swin_unetr" and "swin_unetr, 64³ crop" in result.stdout
    patch_embedding = 48 * 1 * 2 * 2 * 2  # the floor's extra tensor (the patch embedding's weight)
    assert rows["tcurlora-auto"]["trainable"] - (rows["floor"]["trainable"] - patch_embedding) == 8 * 8 * 6 * 8
