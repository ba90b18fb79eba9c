"""Training-step time and peak memory of each fine-tuning method on the paper's ViT-B UNETR, side by side.

    python scripts/bench_adapters.py                      # 64³, batch 1, CPU: every method
    python scripts/bench_adapters.py --crop 128 --batch 4 --device cuda --precision bf16
    python scripts/bench_adapters.py --methods floor tcurlora-factored --steps 10

Each method runs in its own subprocess so that peak memory (CPU: max RSS; GPU: max allocated) is its own.
Methods:
  decoder_only         only decoder2..5 train; the ViT gets no gradient at all
  floor                decoder_only + the position embedding trainable: the gradient is forced through every frozen
                       ViT block, the physical limit for any adapter inside the ViT (DESIGN.md §1.5)
  tcurlora-<mode>      tCURLoRA r=8 on all three tensor groups, forward mode auto | factored | materialized
  full                 everything trains
Also times inference (no grad, eval) of the base model and of the merged tCURLoRA model.
Prints a table and writes JSON (default bench_results/bench_<device>_<crop>_b<batch>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from monai.losses import DiceLoss
from monai.networks.nets import UNETR

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tcurlora_seg.adapters import apply_adapter, count_trainable, merge_adapter  # noqa: E402
from tcurlora_seg.adapters.base import freeze_for_adapter  # noqa: E402

METHODS = ["decoder_only", "floor", "tcurlora-auto", "tcurlora-factored", "tcurlora-materialized", "full"]


def paper_unetr(crop: int) -> UNETR:
    """The paper's UNETR (DESIGN.md §2) at img_size = crop."""
    return UNETR(
        in_channels=1, out_channels=2, img_size=(crop,) * 3, feature_size=16, hidden_size=768, mlp_dim=3072,
        num_heads=12, proj_type="conv", norm_name="instance", res_block=True, dropout_rate=0.1, qkv_bias=False,
    )


def prepare(method: str, model: UNETR, rank: int) -> UNETR:
    if method == "full":
        model.requires_grad_(True)
    elif method in ("decoder_only", "floor"):
        freeze_for_adapter(model)
        if method == "floor":
            model.vit.patch_embedding.position_embeddings.requires_grad_(True)
    elif method.startswith("tcurlora-"):
        apply_adapter(model, "tcurlora", rank=rank, mode=method.split("-", 1)[1])
    else:
        raise SystemExit(f"unknown method {method}; choose from {METHODS}")
    return model


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def worker(args: argparse.Namespace) -> dict:
    """One method in this process: time training steps, and for tCURLoRA also merged inference."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    method = args.worker
    model = paper_unetr(args.crop).to(device)
    x = torch.randn(args.batch, 1, *(args.crop,) * 3, device=device)
    y = (torch.rand(args.batch, 1, *(args.crop,) * 3, device=device) > 0.7).float()
    result: dict = {"method": method}

    if method == "inference":  # base model vs merged tCURLoRA, same process, same input
        model.eval()

        def infer():
            with torch.no_grad(), autocast:
                model(x)

        result["base_s"] = statistics.median(time_steps(infer, args.steps, args.warmup, device))
        apply_adapter(model, "tcurlora", rank=args.rank)
        merge_adapter(model)
        result["merged_s"] = statistics.median(time_steps(infer, args.steps, args.warmup, device))
        result["ratio"] = result["merged_s"] / result["base_s"]
        return result

    prepare(method, model, args.rank)
    model.train()
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    times = time_steps(step, args.steps, args.warmup, device)
    result.update(
        step_s=statistics.median(times), step_min_s=min(times), trainable=count_trainable(model),
        peak_mb=peak_memory_mb(device),
    )
    return result


def run_all(args: argparse.Namespace) -> dict:
    rows = []
    for method in args.methods + (["inference"] if not args.no_inference else []):
        cmd = [sys.executable, __file__, "--worker", method] + [
            f"--{k}={v}" for k, v in (("crop", args.crop), ("batch", args.batch), ("device", args.device),
                                      ("precision", args.precision), ("rank", args.rank), ("steps", args.steps),
                                      ("warmup", args.warmup))
        ]
        print(f"... {method}", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(f"benchmark of {method} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by_name = {r["method"]: r for r in rows}
    for ref in ("decoder_only", "floor"):
        if ref in by_name:
            for r in rows:
                if "step_s" in r:
                    r[f"vs_{ref}"] = r["step_s"] / by_name[ref]["step_s"]
    return {
        "settings": {k: getattr(args, k) for k in ("crop", "batch", "device", "precision", "rank", "steps", "warmup")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "results": rows,
    }


def print_table(report: dict) -> None:
    s = report["settings"]
    print(f"\n{s['crop']}³ crop, batch {s['batch']}, {s['device']}, {s['precision']}, median of {s['steps']} steps")
    print(f"| method | trainable | step s | vs decoder-only | vs floor | peak MB |\n|---|---|---|---|---|---|")
    for r in report["results"]:
        if "step_s" in r:
            print(f"| {r['method']} | {r['trainable']:,} | {r['step_s']:.3f} | {r.get('vs_decoder_only', float('nan')):.2f} "
                  f"| {r.get('vs_floor', float('nan')):.2f} | {r['peak_mb']:.0f} |")
        else:
            print(f"\ninference: base {r['base_s']:.3f} s, merged tCURLoRA {r['merged_s']:.3f} s, ratio {r['ratio']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench_results/bench_<device>_<crop>_b<batch>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    report = run_all(args)
    print_table(report)
    out = args.out or REPO / "bench_results" / f"bench_{args.device.split(':')[0]}_{args.crop}_b{args.batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
