"""Where tCURLoRA's training step spends its time beyond the floor: torch.profiler on one model, method by method.

    python scripts/profile_tcurlora.py                       # ViT-B UNETR, 64³ batch 1, CPU: floor, LoRA r=32, tCURLoRA
    python scripts/profile_tcurlora.py --crop 128 --steps 1  # 512 tokens per call
    python scripts/profile_tcurlora.py --methods floor tcurlora-factored tcurlora-fused --device cuda --crop 128 --batch 4

Each method is profiled in this process after ``--warmup`` steps (the model, input and training step of
scripts/bench_adapters.py). Prints, per method, the step's total time, the matrix products (aten::mm / bmm / addmm:
calls and self time) and the ops that take the most self time, then the excess over the first method per op. The
per-op numbers are what the closing notes of the speed work quote; step-time ratios belong to bench_adapters.py,
which alternates methods over rounds in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import METHODS, batch, network, prepare, training_step  # noqa: E402

GEMMS = ("aten::mm", "aten::bmm", "aten::addmm")  # not aten::linear: it only calls addmm / mm, counted once there


def profile_method(args: argparse.Namespace, method: str) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = prepare(method, network(args.model, args.crop).to(device), args.rank, args.model)
    step = training_step(model, *batch(args, device))
    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) / args.steps
    ops: dict[str, dict] = defaultdict(lambda: {"calls": 0, "self_ms": 0.0})
    for event in prof.key_averages():
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        ops[event.key]["calls"] += event.count / args.steps
        ops[event.key]["self_ms"] += self_us / 1e3 / args.steps
    return {"method": method, "step_ms": wall * 1e3, "ops": dict(ops)}


def summary(result: dict) -> str:
    gemm = [result["ops"][k] for k in GEMMS if k in result["ops"]]
    calls, ms = sum(g["calls"] for g in gemm), sum(g["self_ms"] for g in gemm)
    return f"{result['method']}: step {result['step_ms']:.0f} ms (profiled); matrix products {calls:.0f} calls, {ms:.0f} ms self"


def excess(base: dict, other: dict, top: int) -> list[str]:
    """The ops whose self time per step grew most from ``base`` to ``other``."""
    keys = set(base["ops"]) | set(other["ops"])
    zero = {"calls": 0, "self_ms": 0.0}
    rows = sorted(((other["ops"].get(k, zero)["self_ms"] - base["ops"].get(k, zero)["self_ms"], k) for k in keys), reverse=True)
    lines = []
    for diff, key in rows[:top]:
        a, b = base["ops"].get(key, zero), other["ops"].get(key, zero)
        lines.append(f"  {key:<32} +{diff:8.1f} ms   calls {a['calls']:.0f} -> {b['calls']:.0f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["unetr", "swin_unetr"], default="unetr")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top", type=int, default=8, help="ops listed per method")
    parser.add_argument("--methods", nargs="+", default=["floor", "lora", "tcurlora-auto"], choices=METHODS, metavar="METHOD")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: bench_results/profile_<device>_<crop>_b<batch>.json)")
    args = parser.parse_args()
    out = args.out or Path("bench_results") / f"profile_{args.device.split(':')[0]}_{args.crop}_b{args.batch}.json"
    results = [profile_method(args, m) for m in args.methods]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args) | {"out": str(out)}, "results": results}, indent=2))
    base = results[0]
    for result in results:
        print(summary(result))
        if result is not base:
            print(f" excess over {base['method']}:")
            print("\n".join(excess(base, result, args.top)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
