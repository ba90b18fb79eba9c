"""Training-step time and peak memory of each fine-tuning method on the paper's ViT-B UNETR (or Swin UNETR), side by side.

    python scripts/bench_adapters.py                      # every method: 64³ batch 1 fp32 on CPU, and, when a GPU is
                                                          # present, also 128³ batch 4 (the paper's) with bf16 autocast
    python scripts/bench_adapters.py --crop 128 --batch 4 --device cuda --precision bf16   # one setting only
    python scripts/bench_adapters.py --methods decoder_only lora --steps 1 --warmup 0 --crop 32 --no-inference
    python scripts/bench_adapters.py --model swin_unetr   # MONAI's Swin UNETR, feature 48 (configs/model/swin_unetr.yaml)

On the CPU each method runs in its own subprocess, so that its peak memory (max RSS) is its own; on a GPU all run in
this process (peak = max allocated since the method began, after the previous one's memory is freed), which saves
about 15 s of start-up per method. ``--subprocess`` forces a process per method there too.
The JSON file is rewritten after every method ("complete": false until the last), so a run that is cut off
(a time limit on a lent GPU) keeps the methods it finished.
Step time and peak memory are also given as ratios to decoder-only (and step time to the floor) from the same run.
Methods:
  decoder_only         only decoder2..5 train; the ViT gets no gradient at all
  floor                decoder_only + the transformer's first tensor trainable (UNETR: position embedding; Swin UNETR:
                       patch embedding): the gradient is forced through every frozen transformer block, the physical
                       limit for any adapter inside the transformer (DESIGN.md §1.5)
  lora dora pissa      HF peft on the ViT linears, default options of tcurlora_seg.adapters (LoRA/DoRA r=32, PiSSA r=2,
  loha lokr            LoHa r=16, LoKr r=8)
  curlora lora_pt      matrix CURLoRA r=2; LoRA-PT r=8 (principal t-SVD of the three tensors)
  tcurlora-<mode>      tCURLoRA r=--rank (default 8) on all three tensor groups, forward mode auto | factored |
                       materialized | fused
  full                 everything trains
Also times inference (no grad, eval) of the base model and of the merged tCURLoRA model.
Prints a table per setting and writes JSON (default bench_results/bench_<device>_<crop>_b<batch>.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.losses import DiceLoss
from omegaconf import OmegaConf
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tcurlora_seg.adapters import ADAPTERS, apply_adapter, count_trainable, merge_adapter, trainable_groups  # noqa: E402
from tcurlora_seg.adapters.backbones import backbone_of  # noqa: E402
from tcurlora_seg.models import build_network  # noqa: E402

METHODS = [
    "decoder_only", "floor", "lora", "dora", "pissa", "loha", "lokr", "curlora", "lora_pt",
    "tcurlora-auto", "tcurlora-factored", "tcurlora-materialized", "tcurlora-fused", "full",
]
# The settings of a plain run: the CPU one always, the paper's GPU one (batch 4, 128³, bf16 autocast) when a GPU exists.
CPU_SETTING = {"crop": 64, "batch": 1, "device": "cpu", "precision": "fp32"}
GPU_SETTING = {"crop": 128, "batch": 4, "device": "cuda", "precision": "bf16"}


# --model -> configs/model/<name>.yaml, and the tensor that makes the floor's gradient cross every frozen block
MODELS = {"unetr": "vit.patch_embedding.position_embeddings", "swin_unetr": "swinViT.patch_embed.proj.weight"}


def network(name: str, crop: int) -> nn.Module:
    """The paper's UNETR (DESIGN.md §2, configs/model/unetr.yaml) or Swin UNETR (feature 48) at a crop³ input."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"))
    return build_network({**cfg, "img_size": [crop] * 3, "pretrained": None})


def prepare(method: str, model: nn.Module, rank: int, name: str = "unetr") -> nn.Module:
    if method == "floor":
        apply_adapter(model, "decoder_only")
        model.get_parameter(MODELS[name]).requires_grad_(True)
    elif method.startswith("tcurlora-"):
        apply_adapter(model, "tcurlora", rank=rank, mode=method.split("-", 1)[1])
    elif method in ADAPTERS and method != "tcurlora":
        apply_adapter(model, method)  # the method's default options
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


def batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.autocast]:
    """The benchmark's input, its label and the autocast context of ``--precision``."""
    x = torch.randn(args.batch, 1, *(args.crop,) * 3, device=device)
    y = (torch.rand(args.batch, 1, *(args.crop,) * 3, device=device) > 0.7).float()
    return x, y, torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> Callable[[], None]:
    """One Adam step of ``model`` on (x, y), the trainer's loss."""
    model.train()
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def transformer_step(model: nn.Module, x: torch.Tensor, autocast) -> Callable[[], None]:
    """One Adam step through the transformer alone (UNETR ``vit``, Swin UNETR ``swinViT``; loss: mean square of every
    output it hands the decoder): an adapter's cost without the decoder's convolutions, whose time varies more
    between steps than the whole ViT-B adapter costs at 64³."""
    model.train()
    transformer = model.get_submodule(backbone_of(model).transformer)
    # the method's own tensors, wherever they live (tCURLoRA's cores and LoRA-PT's factors sit beside the transformer)
    params = trainable_groups(model)[0]
    if not params:
        raise SystemExit("--transformer-only: this method trains nothing in the transformer (decoder_only); leave it out")
    optimizer = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = transformer(x)
            outputs = [out[0], *out[1]] if isinstance(out, tuple) else list(out)  # UNETR: (x, hidden states)
            loss = sum(o.float().square().mean() for o in outputs)
        loss.backward()
        optimizer.step()

    return step


def interleaved(args: argparse.Namespace) -> dict:
    """Every method's model in this one process, one step of each in turn, ``rounds × steps`` times (after ``warmup``
    steps each): step-time ratios free of what differs between processes (a host's clock, memory placement), which
    moves single-process medians by up to ±10 % here. No peak memory (one process holds every model); the default
    mode measures that. Inference: the base model and the merged tCURLoRA model, alternating likewise."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    x, y, autocast = batch(args, device)
    calls, trainable = {}, {}
    for method in args.methods:
        model = prepare(method, network(args.model, args.crop).to(device), args.rank, args.model)
        step = transformer_step(model, x, autocast) if args.transformer_only else training_step(model, x, y, autocast)
        calls[method], trainable[method] = step, count_trainable(model)
    if not args.no_inference:
        base = network(args.model, args.crop).to(device).eval()
        merged = network(args.model, args.crop).to(device).eval()
        apply_adapter(merged, "tcurlora", rank=args.rank)
        merge_adapter(merged)
        for name, model in (("inference_base", base), ("inference_merged", merged)):
            def infer(model=model) -> None:
                with torch.no_grad(), autocast:
                    model(x)
            calls[name] = infer
    times: dict[str, list[float]] = {m: [] for m in calls}
    for fn in calls.values():
        time_steps(fn, 0, args.warmup, device)
    for _ in range(args.rounds * args.steps):
        for method, fn in calls.items():
            times[method] += time_steps(fn, 1, 0, device)
    rows = [{"method": m, "step_s": statistics.median(times[m]), "step_min_s": min(times[m]), "trainable": trainable[m],
             "peak_mb": None, "rounds": args.rounds} for m in args.methods]
    if not args.no_inference:
        base_s, merged_s = statistics.median(times["inference_base"]), statistics.median(times["inference_merged"])
        rows.append({"method": "inference", "base_s": base_s, "merged_s": merged_s, "ratio": merged_s / base_s})
    return report_of(args, rows, True)


def worker(args: argparse.Namespace) -> dict:
    """One method in this process: time training steps, and for tCURLoRA also merged inference."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    method = args.worker
    model = network(args.model, args.crop).to(device)
    x, y, autocast = batch(args, device)
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

    step = training_step(prepare(method, model, args.rank, args.model), x, y, autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, args.steps, args.warmup, device)
    result.update(
        step_s=statistics.median(times), step_min_s=min(times), trainable=count_trainable(model),
        peak_mb=peak_memory_mb(device),
    )
    return result


def in_process(args: argparse.Namespace, method: str) -> dict:
    """One method in this process (GPU): the previous method's tensors are freed before the peak is reset."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(args.device)
    print(f"... {method}", file=sys.stderr, flush=True)
    return worker(argparse.Namespace(**{**vars(args), "worker": method}))


def run_worker(args: argparse.Namespace, method: str) -> dict:
    if args.device.startswith("cuda") and not args.subprocess:
        return in_process(args, method)
    cmd = [sys.executable, __file__, "--worker", method] + [
        f"--{k}={v}" for k, v in (("model", args.model), ("crop", args.crop), ("batch", args.batch), ("device", args.device),
                                  ("precision", args.precision), ("rank", args.rank), ("steps", args.steps),
                                  ("warmup", args.warmup))
    ]
    print(f"... {method}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        raise SystemExit(f"benchmark of {method} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def combine(runs: list[dict]) -> dict:
    """One method over several rounds: median of the rounds' step medians, the largest peak memory."""
    row = dict(runs[0])
    for key in ("step_s", "base_s", "merged_s", "ratio"):
        if key in row:
            row[key] = statistics.median(r[key] for r in runs)
    if "step_s" in row:
        row["step_min_s"] = min(r["step_min_s"] for r in runs)
        row["peak_mb"] = max(r["peak_mb"] for r in runs)
    row["rounds"] = len(runs)
    return row


def run_all(args: argparse.Namespace, out: Path) -> dict:
    # Methods alternate within each round, so that a slow drift of the machine (thermal, other load) spreads over
    # all of them instead of biasing whichever ran last.
    methods = args.methods + (["inference"] if not args.no_inference else [])
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    start, rounds, budget = time.monotonic(), args.rounds, getattr(args, "budget_s", None)
    for round_ in range(args.rounds):
        if round_ and budget is not None and (time.monotonic() - start) * (round_ + 1) / round_ > budget:
            rounds = round_
            print(f"stopping after {round_} round(s): another would end past --budget-s {budget:g}", file=sys.stderr)
            break
        for i, method in enumerate(methods):
            runs[method].append(run_worker(args, method))
            complete = round_ == rounds - 1 and i == len(methods) - 1
            write_report(report_of(args, [combine(r) for r in runs.values() if r], complete), out)
    report = report_of(args, [combine(runs[m]) for m in methods], True)
    write_report(report, out)
    return report


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)  # a reader (or a cut-off) never sees half a file


def report_of(args: argparse.Namespace, rows: list[dict], complete: bool) -> dict:
    """The report of the methods measured so far, with ratios to decoder-only and the floor when those ran."""
    by_name = {r["method"]: r for r in rows}
    for ref in ("decoder_only", "floor"):
        if ref in by_name:
            for r in rows:
                if "step_s" in r:
                    r[f"vs_{ref}"] = r["step_s"] / by_name[ref]["step_s"]
                    if ref == "decoder_only" and r["peak_mb"] is not None:
                        r["mem_vs_decoder_only"] = r["peak_mb"] / by_name[ref]["peak_mb"]
    return {
        "complete": complete,
        "settings": {k: getattr(args, k, None) for k in ("model", "crop", "batch", "device", "precision", "rank", "steps",
                                                          "warmup", "rounds", "budget_s", "interleave")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "results": rows,
    }


def print_table(report: dict) -> None:
    s = report["settings"]
    print(f"\n{s.get('model', 'unetr')}, {s['crop']}³ crop, batch {s['batch']}, {s['device']}, {s['precision']}, median of {s['steps']} steps × {s.get('rounds', 1)} rounds")
    print("| method | trainable | step s | step vs decoder-only | step vs floor | peak MB | memory vs decoder-only |")
    print("|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in report["results"]:
        if "step_s" in r:
            peak = "–" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            print(f"| {r['method']} | {r['trainable']:,} | {r['step_s']:.3f} | {r.get('vs_decoder_only', nan):.2f} "
                  f"| {r.get('vs_floor', nan):.2f} | {peak} | {r.get('mem_vs_decoder_only', nan):.2f} |")
        else:
            print(f"\ninference: base {r['base_s']:.3f} s, merged tCURLoRA {r['merged_s']:.3f} s, ratio {r['ratio']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="unetr",
                        help="unetr (the paper's ViT-B UNETR) or swin_unetr (MONAI's Swin UNETR, feature 48)")
    parser.add_argument("--crop", type=int, default=None, help="cube side (default: 64 on CPU, 128 on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 4 on GPU")
    parser.add_argument("--device", default=None, help="cpu | cuda[:N] (default: CPU, plus GPU when one is present)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--rank", type=int, default=8, help="tCURLoRA rank (the other methods use their defaults)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="repeat every method this often, alternating (robust medians)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no round that would end after this many seconds (a lent GPU's time limit); "
                             "the first round always runs")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, metavar="METHOD")
    parser.add_argument("--no-inference", action="store_true")
    parser.add_argument("--subprocess", action="store_true", help="GPU: one process per method as on the CPU")
    parser.add_argument("--interleave", action="store_true",
                        help="all methods in this process, one step each in turn: steadier ratios, no peak memory")
    parser.add_argument("--transformer-only", action="store_true",
                        help="with --interleave: time the transformer's forward, backward and Adam step alone (no decoder)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench_results/bench_[<model>_]<device>_<crop>_b<batch>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.transformer_only and not args.interleave:
        parser.error("--transformer-only needs --interleave")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    runs = settings(args)
    for setting in runs:
        run = argparse.Namespace(**{**vars(args), **setting})
        model = "" if run.model == "unetr" else f"{run.model}_"
        out = args.out or REPO / "bench_results" / f"bench_{model}{run.device.split(':')[0]}_{run.crop}_b{run.batch}.json"
        if args.out and len(runs) > 1:  # one file per setting
            out = out.with_name(f"{out.stem}_{run.device.split(':')[0]}{out.suffix}")
        if run.interleave:
            report = interleaved(run)
            write_report(report, out)
        else:
            report = run_all(run, out)  # written after every method, the last time complete
        print_table(report)
        print(f"\nwrote {out}")


def settings(args: argparse.Namespace) -> list[dict]:
    """The (crop, batch, device, precision) runs: the ones given, else CPU and (with a GPU) the paper's GPU setting."""
    given = {k: getattr(args, k) for k in CPU_SETTING if getattr(args, k) is not None}
    if given:
        device = given.get("device", "cpu")
        base = GPU_SETTING if device.startswith("cuda") else CPU_SETTING
        return [{**base, **given, "device": device}]
    return [CPU_SETTING] + ([GPU_SETTING] if torch.cuda.is_available() else [])


if __name__ == "__main__":
    main()
