"""N data-parallel processes (torchrun) against one process with the same global batch: loss curves and wall time.

    python scripts/bench_ddp.py                          # 2 gloo processes on the CPU vs 1 process, demo-width UNETR
    python scripts/bench_ddp.py --nproc 4 --device cuda  # 4 GPUs (nccl) vs 1 GPU
    python scripts/bench_ddp.py --steps 40 -- model=unetr data.roi_size=[96,96,96]

The cohort is synthetic (a bright box in noise, written as NIfTI into a temporary folder) with volumes as large as
the crop and no flips, intensity noise or dropout, so that nothing random differs between the two launches but the
order of the cases within a step: the loss curves must then agree to floating-point tolerance. Both runs train
``--steps`` iterations; wall time is the whole command (start-up, data check, validation included) and the mean time
per training step is rank 0's (train_stats.json). Prints a table and writes JSON (bench_results/ddp_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_cohort(root: Path, n: int, size: int) -> Path:
    """``n`` training cases (a bright box in noise, 1 mm) in the official layout; two more for validation."""
    rng = np.random.default_rng(0)
    for i in range(1, n + 3):
        label = np.zeros((size,) * 3, np.uint8)
        x0, y0, z0 = rng.integers(size // 8, size // 2, size=3)
        label[x0:x0 + size // 3, y0:y0 + size // 4, z0:z0 + size // 4] = 1
        image = (rng.normal(0.0, 0.3, label.shape) + 1.0 + 2.0 * label).astype(np.float32)
        (root / f"sub{i}").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / f"sub{i}" / f"sub{i}_img.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / f"sub{i}" / f"sub{i}_mask.nii.gz")
    (root / "train.txt").write_text("".join(f"sub{i}\n" for i in range(1, n + 1)))
    (root / "valid.txt").write_text(f"sub{n + 1}\nsub{n + 2}\n")
    (root / "test.txt").write_text("")
    return root


def losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


def launch(nproc: int, batch: int, root: Path, run: Path, args: argparse.Namespace, extra: list[str]) -> float:
    """One training run; returns its wall time in seconds."""
    overrides = [
        "data=official", f"data.root={root}", f"data.roi_size=[{args.size},{args.size},{args.size}]",
        "data.num_workers=0", "data.cache=memory", "data.augment.flip_prob=0", "data.augment.intensity_prob=0",
        "data.split.test=0", f"data.batch_size={batch}", "model=unetr_demo", "model.dropout_rate=0",
        "model.pretrained=null", "optim=sgd", "trainer.max_epochs=1", f"trainer.epoch_length={args.steps}",
        "trainer.val_interval=1", "trainer.progress=false", "trainer.evaluate=false", "trainer.log_images=false",
        f"trainer.device={args.device}", f"hydra.run.dir={run}", *extra,
    ]
    prefix = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    # the CPU's threads are shared out: N processes x (threads / N) against 1 process x threads
    threads = max(1, (args.threads or os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *prefix, "-m", "tcurlora_seg.train", *overrides], env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: the {nproc}-process run failed:\n{result.stderr[-3000:]}")
    return wall


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="crops per process (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="training iterations of each run (default 20)")
    parser.add_argument("--size", type=int, default=48, help="volume and crop edge, a multiple of 16 (default 48)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    parser.add_argument("--threads", type=int, help="CPU threads in all (default: every core)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench_results/ddp_<device>.json)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = write_cohort(Path(tmp) / "cohort", args.nproc * args.batch, args.size)
        runs = {"ddp": Path(tmp) / "ddp", "single": Path(tmp) / "single"}
        wall = {"ddp": launch(args.nproc, args.batch, root, runs["ddp"], args, extra),
                "single": launch(1, args.nproc * args.batch, root, runs["single"], args, extra)}
        curves = {name: losses(run) for name, run in runs.items()}
        step = {name: json.loads((run / "train_stats.json").read_text())["step_time_s"] for name, run in runs.items()}
    diff = max(abs(a - b) for a, b in zip(curves["ddp"], curves["single"]))
    result = {
        "setting": {**vars(args), "out": None, "global_batch": args.nproc * args.batch, "overrides": extra},
        "wall_s": wall, "step_time_s": step, "wall_ratio_ddp_over_single": wall["ddp"] / wall["single"],
        "step_ratio_ddp_over_single": step["ddp"] / step["single"], "max_loss_difference": diff,
        "loss_ddp": curves["ddp"], "loss_single": curves["single"],
    }
    print(f"{args.nproc} x batch {args.batch} ({args.device}) vs 1 x batch {args.nproc * args.batch}, "
          f"{args.steps} steps, {args.size}³, demo-width UNETR")
    print("| run | wall s | step s | first loss | last loss |\n|---|---:|---:|---:|---:|")
    for name in ("single", "ddp"):
        print(f"| {name} | {wall[name]:.1f} | {step[name]:.3f} | {curves[name][0]:.6f} | {curves[name][-1]:.6f} |")
    print(f"wall ratio {result['wall_ratio_ddp_over_single']:.2f}, step ratio {result['step_ratio_ddp_over_single']:.2f},"
          f" largest loss difference over {len(curves['ddp'])} steps {diff:.2e}")
    out = args.out or REPO / "bench_results" / f"ddp_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
