"""scripts/bench_adapters.py: the report it writes, also when the run is cut off part-way."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.run_helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_adapters.py"


def args_for(out: Path, methods: list[str]) -> argparse.Namespace:
    return argparse.Namespace(model="unetr", crop=32, batch=1, device="cpu", precision="fp32", rank=2, steps=1, warmup=0, rounds=1,
                              methods=methods, no_inference=True, subprocess=False, transformer_only=False, out=out)


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


def test_a_time_budget_stops_before_a_round_that_would_overrun_it(tmp_path, monkeypatch):
    bench = load_script("bench_adapters")
    out = tmp_path / "bench.json"
    clock = [0.0]

    def fake_worker(args, method):
        clock[0] += 10.0  # every method takes 10 s: a round of two takes 20 s
        return {"method": method, "step_s": clock[0], "step_min_s": clock[0], "trainable": 1, "peak_mb": 100.0}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    monkeypatch.setattr(bench.time, "monotonic", lambda: clock[0])
    args = args_for(out, ["decoder_only", "floor"])
    args.rounds, args.budget_s = 4, 45.0  # 2 rounds end at 40 s; a third would end at 60 s
    report = bench.run_all(args, out)
    assert [r["rounds"] for r in report["results"]] == [2, 2]
    written = json.loads(out.read_text())
    assert written["complete"] is True and written["settings"]["budget_s"] == 45.0
    assert written["results"][0]["step_s"] == pytest.approx(20.0)  # median of the two rounds' 10 s and 30 s


def test_interleaved_mode_alternates_every_method_in_one_process(tmp_path, monkeypatch):
    from tests.conftest import make_tiny_unetr

    bench = load_script("bench_adapters")
    monkeypatch.setattr(bench, "network", lambda name, crop: make_tiny_unetr())
    order = []
    real_step = bench.training_step

    def recording_step(model, x, y, autocast):
        step, name = real_step(model, x, y, autocast), f"model{len(order)}"
        order.append(name)
        return lambda: (order.append(name), step())

    monkeypatch.setattr(bench, "training_step", recording_step)
    args = args_for(tmp_path / "bench.json", ["decoder_only", "tcurlora-auto"])
    args.rounds, args.steps, args.warmup, args.interleave, args.no_inference = 2, 2, 1, True, False
    report = bench.interleaved(args)
    # built in order, one warm-up each, then 2 rounds x 2 steps taken in turn
    assert order == ["model0", "model1"] + ["model0", "model1"] * 5
    rows = {r["method"]: r for r in report["results"]}
    assert rows["tcurlora-auto"]["trainable"] - rows["decoder_only"]["trainable"] == 2 * 2 * (48 + 12 + 12)
    assert rows["tcurlora-auto"]["peak_mb"] is None and rows["tcurlora-auto"]["vs_decoder_only"] > 0
    assert rows["inference"]["ratio"] == pytest.approx(rows["inference"]["merged_s"] / rows["inference"]["base_s"])


def test_transformer_only_steps_train_the_adapter_and_leave_the_decoder_alone(tmp_path, monkeypatch):
    from tests.conftest import make_tiny_unetr

    bench = load_script("bench_adapters")
    model = bench.prepare("tcurlora-auto", make_tiny_unetr(), 2)
    decoder = {k: v.clone() for k, v in model.decoder2.state_dict().items()}
    x = torch.randn(1, 1, 32, 32, 32)
    step = bench.transformer_step(model, x, torch.autocast("cpu", enabled=False))
    step()
    step()  # a second pass without the model's pre-hook: the groups drop their factors after each backward
    assert all(g.tcur_U.abs().sum() > 0 for g in model.tcur_groups.values())
    assert all(torch.equal(v, model.decoder2.state_dict()[k]) for k, v in decoder.items())
    # LoRA-PT's factors, like tCURLoRA's cores, live beside the transformer (model.lorapt_groups): they train too
    model = bench.prepare("lora_pt", make_tiny_unetr(), 2)
    factors = {k: v.clone() for k, v in model.lorapt_groups.named_parameters()}
    bench.transformer_step(model, x, torch.autocast("cpu", enabled=False))()
    assert factors and all(not torch.equal(v, model.lorapt_groups.get_parameter(k)) for k, v in factors.items())
    with pytest.raises(SystemExit, match="decoder_only"):
        bench.transformer_step(bench.prepare("decoder_only", make_tiny_unetr(), 2), x, torch.autocast("cpu", enabled=False))
    monkeypatch.setattr(bench, "network", lambda name, crop: make_tiny_unetr())
    args = args_for(tmp_path / "bench.json", ["floor", "tcurlora-auto"])
    args.rounds, args.steps, args.warmup, args.interleave, args.transformer_only = 1, 1, 0, True, True
    rows = {r["method"]: r for r in bench.interleaved(args)["results"]}
    assert set(rows) == {"floor", "tcurlora-auto"} and all(r["step_s"] > 0 for r in rows.values())


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


@pytest.mark.slow  # five processes each building the 92 M-parameter ViT-B UNETR: about 2 min on 2 cores; -m slow
def test_the_gpu_benchmark_script_runs_whole_on_a_cpu_at_a_tiny_setting(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "OUT": str(tmp_path), "DEVICE": "cpu",
           "CROP": "32", "BATCH": "1", "STEPS": "1", "WARMUP": "0", "ROUNDS": "1", "METHODS": "floor tcurlora-auto",
           "PRECISIONS": "fp32", "PROFILE_METHODS": "floor tcurlora-auto"}  # bf16 products are emulated on CPUs without bf16 units: minutes instead of seconds
    result = subprocess.run(["bash", str(REPO / "scripts" / "bench_gpu.sh")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "bench_cpu_32_b1_fp32.json").read_text())
    assert report["complete"] and report["settings"]["precision"] == "fp32"
    assert [r["method"] for r in report["results"]] == ["floor", "tcurlora-auto", "inference"]
    profile = json.loads((tmp_path / "profile_cpu_32_b1.json").read_text())
    assert [r["method"] for r in profile["results"]] == ["floor", "tcurlora-auto"]
    tcur = profile["results"][1]["ops"]
    assert tcur["aten::mm"]["calls"] > profile["results"][0]["ops"]["aten::mm"]["calls"]  # the adapter's products
    assert "excess over floor" in result.stdout


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


def test_tcur_path_candidates_agree_with_the_package_path():
    """scripts/bench_tcur_paths.py: each candidate it times equals the factored path (float64), and V's gradient
    batched per tensor group equals the per-linear sum; a candidate that drifted would fail here, not only at the
    benchmark's start."""
    paths = load_script("bench_tcur_paths")
    paths.check_exact()
    args = argparse.Namespace(rank=2, reps=1, device="cpu")
    timed = paths.group_core_grads(2, args)  # asserts batched == per linear inside
    assert set(timed) == set(paths.GROUPS) and all(a > 0 and b > 0 for a, b in timed.values())
    # every ΔS_k of a tensor by one FFT equals the package's per-linear slices (asserted inside), q/k/v-like
    # linears of 3 slices and single-slice ones mixed as in the attention tensor
    formed = paths.formation(args, {"attn-like": (6, 5, 8, [(2, 3), (2, 1)])})
    assert set(formed["attn-like"]) == {"per linear", "FFT", "W + ΔS"}
