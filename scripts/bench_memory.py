"""Peak memory on the CPU of what real datasets cost, each measurement in a fresh process (its own ru_maxrss).

    python scripts/bench_memory.py                                    # ViT-B UNETR (configs/model/unetr.yaml), 128³,
                                                                      # one 240x240x155 volume: minutes, several GB
    python scripts/bench_memory.py --model unetr_tiny --crop 32 --shape 48 40 36   # the same path in seconds
    python scripts/bench_memory.py --measurements train_step sliding_window        # without the baseline process

Measurements (each in its own ``python scripts/bench_memory.py --worker NAME`` process):
  baseline       the imports and the model built (the project's ``build_model``: ``--model`` with tCURLoRA,
                 configs/peft/tcurlora.yaml), nothing run: the floor under the two below
  train_step     one training step at ``--crop``³, batch ``--batch``: the project's model, its optimizer groups
                 (``param_groups``, Adam of configs/optim/adam.yaml) and the trainer's Dice loss on softmax; random
                 input and label (memory does not depend on the values); also the RSS just before the step
  sliding_window one volume of ``--shape`` through the project's inference (``Segmenter.from_run`` on a run folder as
                 training writes it, then ``segment``: the file read, test transforms, ``--crop``³ windows at overlap 0.5
                 with gaussian blending, softmax stitched on the CPU, the mask on the file's grid)
The run folder and the volume of sliding_window are written by the train_step process after its measurement.
Peak = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the worker (Linux: KiB, shown in MiB) at its end; this
launcher imports neither torch nor numpy, so what a forked worker inherits into its ru_maxrss is small (``VmHWM``,
the worker's own high-water mark from /proc, is given too). The model is randomly initialised: a pretrained file
holds the same tensors. Results: a table and JSON (default bench_results/bench_memory_<model>_<crop>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MEASUREMENTS = ("baseline", "train_step", "sliding_window")
BRATS_SHAPE = (240, 240, 155)


# --- workers (heavy imports inside) --------------------------------------------------------------------------------


def current_rss_mib() -> float | None:
    """This process's resident memory now (Linux /proc VmRSS), in MiB."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    return next((round(int(line.split()[1]) / 1024, 1) for line in lines if line.startswith("VmRSS:")), None)


def peak() -> dict[str, float | None]:
    """This process's peak RSS: ru_maxrss and, on Linux, VmHWM (the memory map's own high-water mark), in MiB."""
    import resource

    out: dict[str, float | None] = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                                    "vm_hwm_mib": None}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["vm_hwm_mib"] = round(int(line.split()[1]) / 1024, 1)
    return out


def compose_config(args: argparse.Namespace, work: Path):
    """configs/train.yaml with ``--model``, tCURLoRA and ``--crop``³ (the data root is the scratch folder: unused)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[
            f"model={args.model}", "peft=tcurlora", "data=official", f"data.root={work}",
            f"data.roi_size=[{args.crop},{args.crop},{args.crop}]", "model.pretrained=null", "trainer.device=cpu"])


def write_run(cfg, model, run_dir: Path, volume: Path, shape: tuple[int, ...]) -> None:
    """A run folder (config.yaml + checkpoints/best.pt, as training writes them) and one MRI-like volume."""
    import nibabel as nib
    import numpy as np
    from omegaconf import OmegaConf

    from tcurlora_seg.adapters import adapter_state_dict
    from tcurlora_seg.engine.run import FORMAT, save_run_config
    from tcurlora_seg.models import save_checkpoint

    save_run_config(cfg, run_dir)
    save_checkpoint(run_dir / "checkpoints" / "best.pt", {
        "format": FORMAT, "epoch": 1, "iteration": 1, "metric": None,
        "config": OmegaConf.to_container(cfg, resolve=True), "adapter": adapter_state_dict(model)})
    rng = np.random.default_rng(0)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    brain = sum(((g - n / 2) / (0.42 * n)) ** 2 for g, n in zip(grids, shape)) < 1  # zero outside, as skull-stripped
    image = np.rint(600 * (1 + 0.05 * rng.standard_normal(shape, dtype=np.float32)) * brain).astype(np.float32)
    volume.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.diag([-1.0, -1.0, 1.0, 1.0])), volume)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tcurlora_seg.engine.run import build_model

    work = Path(args.work)
    run_dir, volume = work / "run", work / "volume.nii.gz"
    result: dict[str, Any] = {"measurement": args.worker, "threads": torch.get_num_threads()}
    start = time.perf_counter()
    if args.worker == "sliding_window":
        from tcurlora_seg.engine.inference import Segmenter

        segmenter = Segmenter.from_run(run_dir, ["best"], device="cpu")
        mask, _ = segmenter.segment(str(volume))
        result.update(mask_shape=list(mask.shape), windows_roi=list(segmenter.inferer.roi_size),
                      overlap=segmenter.inferer.overlap, sw_batch_size=segmenter.inferer.sw_batch_size)
        return {**result, "seconds": round(time.perf_counter() - start, 2), **peak()}
    cfg = compose_config(args, work)
    model, _ = build_model(cfg)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.worker == "train_step":
        from hydra.utils import instantiate
        from monai.losses import DiceLoss

        from tcurlora_seg.engine.trainer import param_groups

        model.train()
        optimizer = instantiate(cfg.optim.optimizer)(param_groups(cfg.optim, model))
        x = torch.randn(args.batch, int(cfg.model.in_channels), *(args.crop,) * 3)
        y = (torch.rand(args.batch, 1, *(args.crop,) * 3) > 0.7).float()
        result["rss_before_step_mib"] = current_rss_mib()  # model, optimizer and batch built
        optimizer.zero_grad(set_to_none=True)
        loss = DiceLoss(to_onehot_y=True, softmax=True)(model(x), y)  # the trainer's loss
        loss.backward()
        optimizer.step()
        result.update(batch=args.batch, crop=args.crop, loss=round(float(loss), 4))
    result.update(seconds=round(time.perf_counter() - start, 2), **peak())
    if args.worker == "train_step":  # after the measurement: what sliding_window reads
        write_run(cfg, model, run_dir, volume, tuple(args.shape))
    return result


# --- launcher (light: no torch, no numpy) --------------------------------------------------------------------------


def measure(args: argparse.Namespace, name: str, work: Path) -> dict[str, Any]:
    """One measurement in a fresh process; its JSON line, or the error it ended with."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--work", str(work),
               "--model", args.model, "--crop", str(args.crop), "--batch", str(args.batch),
               "--shape", *map(str, args.shape)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"measurement": name, "exit_code": proc.returncode, "error": tail}
    return {**json.loads(lines[-1][len("RESULT "):]), "exit_code": 0}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    import platform
    import tempfile

    report: dict[str, Any] = {
        "settings": {"measurements": list(args.measurements), "model": args.model, "crop": args.crop, "batch": args.batch, "shape": list(args.shape),
                     "peft": "tcurlora", "device": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "method": "ru_maxrss (RUSAGE_SELF) of a fresh worker process per measurement, at its end; VmHWM beside it",
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as work:
        for name in args.measurements:
            if name == "sliding_window" and not any(r.get("measurement") == "train_step" and r["exit_code"] == 0
                                                     for r in report["results"]):
                report["results"].append({"measurement": name, "exit_code": None, "error": "skipped: train_step failed"})
                continue
            report["results"].append(measure(args, name, Path(work)))
            print(table_row(report["results"][-1]), flush=True)
    return report


def table_row(r: dict[str, Any]) -> str:
    if r.get("exit_code") != 0:
        return f"{r['measurement']:<16} failed: {r.get('error')}"
    return (f"{r['measurement']:<16} peak RSS {r['peak_rss_mib']:>9.1f} MiB   VmHWM {r['vm_hwm_mib'] or float('nan'):>9.1f} MiB"
            f"   {r['seconds']:>8.2f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unetr", help="configs/model/<name>.yaml (unetr: the paper's ViT-B)")
    parser.add_argument("--crop", type=int, default=128, help="training crop = UNETR img_size = sliding-window roi")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=3, default=list(BRATS_SHAPE), help="the evaluated volume's grid")
    parser.add_argument("--measurements", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS),
                        help="sliding_window needs train_step (which writes its run folder and volume)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default bench_results/bench_memory_<model>_<crop>.json)")
    parser.add_argument("--worker", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    print(f"{args.model}, tCURLoRA, crop {args.crop}³ batch {args.batch}, volume {'x'.join(map(str, args.shape))}, CPU")
    report = run_all(args)
    out = args.out or Path("bench_results") / f"bench_memory_{args.model}_{args.crop}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")
    if any(r.get("exit_code") != 0 for r in report["results"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
