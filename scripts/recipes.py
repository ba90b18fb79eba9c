"""Every shipped recipe end to end on fixtures shaped like the real datasets, through the real entry points.

    python scripts/recipes.py                                  # the paper's ViT-B UNETR (configs/model/unetr.yaml)
    python scripts/recipes.py --model unetr_tiny               # the same steps with the tiny UNETR: a quick CPU check
    python scripts/recipes.py --model unetr_tiny --scale 0.25 --recipes brats msd_brain_tumour   # smaller, fewer

The fixtures (scripts/real_shapes.py: BraTS 2021's 240x240x155 LPS-like grid, MNI152's 182x218x182, MSD's
hippocampus crops and Task01's 4-D files) are written into OUT/data first (or taken from --data). Then, each step a
subprocess (``python -m tcurlora_seg.<step>``):

    brats (source pretraining, +experiment=brats): train (writes source_unetr.pt) -> evaluate -> predict -> export
    eadc, lpba40, upenn_gbm, msd_hippocampus, msd_brain_tumour, each with model.pretrained=<that source_unetr.pt>:
                                                   train -> evaluate -> predict (one test case) -> export

A recipe whose training fails (e.g. a source model the loader cannot fit into that recipe's model) is reported with
its exit code and error line, its other steps are skipped, and the next recipe runs. The budget is shrunk to
``--epochs`` epochs of ``--steps`` steps (default one pass over the training cases) at ``--batch``, no data-loader
workers, validation once at the end, no test evaluation inside training (the evaluate step does it).

Per step the report records the command, wall time, peak RSS, exit code, the load-report lines the training log
prints (``LoadReport.summary``, "Loaded N/M model tensors ...") and the error line; predict also says whether the
mask lies on the input's grid (shape and affine). Peak RSS is ``ru_maxrss`` of the step's own process from
``os.wait4`` (Linux: KiB; the process and the children it waited for), taken by a minimal launcher that forks and
execs the step: the peak of that step alone. (``getrusage(RUSAGE_CHILDREN)`` gives the largest over all steps so far,
and a process forked from this script starts with this script's memory in its ru_maxrss.) Written to OUT/recipes.json (rewritten
after every step: a cut-off run keeps what it finished) and OUT/recipes.md; OUT defaults to outputs/recipes/<time>.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE = "brats"  # the recipe that pretrains the source model of all the others
TARGETS = ("eadc", "lpba40", "upenn_gbm", "msd_hippocampus", "msd_brain_tumour")
RECIPES = (SOURCE, *TARGETS)
STEPS = ("train", "evaluate", "predict", "export")
# the first sentence of LoadReport.summary (tcurlora_seg/models/unetr.py), as the trainer logs it
LOAD_REPORT = re.compile(r"Loaded \d+/\d+ (model )?tensors")
RSS_METHOD = ("ru_maxrss (Linux KiB, shown in MiB) from os.wait4 of each step's process, which a minimal launcher forks "
              "and execs (so it does not inherit this script's memory): the peak of that step alone, with the children "
              "it waited for")


def real_shapes():
    """scripts/real_shapes.py (a sibling script, not a package module)."""
    name = "real_shapes"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


# --- one step: a subprocess, its wall time, peak RSS, exit code and what its log says -----------------------------


def log_lines(text: str) -> tuple[list[str], str | None]:
    """(load-report lines, error line) of a step's output: ``error: ...`` as our entry points print it, else the last
    line of a traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reports = [line.split(" - ", 1)[-1] for line in lines if LOAD_REPORT.search(line)]  # without Hydra's log prefix
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return reports, errors[-1]
    if any(line.startswith("Traceback") for line in lines):
        return reports, lines[-1]
    return reports, None


# Starts a step and reports its rusage: fork + exec from this small process, wait4, the peak into the file argv[1].
# A step started straight from this script would not give its own peak: Linux seeds a new process's ru_maxrss with
# the memory of the process it was forked (or vforked) from, and this script may hold the fixtures it wrote.
LAUNCHER = """import json, os, signal, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)  # negative: killed by that signal
with open(sys.argv[1], "w") as f:
    json.dump({"ru_maxrss_kib": usage.ru_maxrss, "exit_code": code}, f)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_step(command: Sequence[str], log: Path, *, env: dict[str, str] | None = None, timeout: float | None = None,
             cwd: Path | None = None) -> dict[str, Any]:
    """Run ``command`` (through LAUNCHER) with its stdout and stderr into ``log``; return its record: wall time, peak
    RSS, exit code (negative: killed by that signal, as subprocess gives it; -9 after ``timeout``), the load-report
    lines and the error line of its output."""
    log.parent.mkdir(parents=True, exist_ok=True)
    usage = log.with_suffix(".rusage.json")
    usage.unlink(missing_ok=True)
    record: dict[str, Any] = {"command": shlex.join(command), "log": str(log)}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(usage), *command], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the launcher kills the step
            code = proc.wait()
    wall = time.perf_counter() - start
    reports, error = log_lines(log.read_text(errors="replace"))
    measured = json.loads(usage.read_text()) if usage.is_file() else None
    if measured is None:  # the launcher itself failed: its own exit code, its traceback in the log
        return {**record, "wall_s": round(wall, 2), "peak_rss_mib": None, "exit_code": code, "load_report": reports,
                "error": error or "the launcher wrote no rusage"}
    if timeout and wall >= timeout and measured["exit_code"] == -9:
        error = f"timed out after {timeout:g} s (--timeout)"
    return {**record, "wall_s": round(wall, 2), "peak_rss_mib": round(measured["ru_maxrss_kib"] / 1024, 1),
            "exit_code": measured["exit_code"], "load_report": reports, "error": error}


# --- the plan: which commands, in which order ----------------------------------------------------------------------


def scaled_roi(roi: Sequence[int], scale: float) -> list[int]:
    """A recipe's roi_size on grids shrunk by ``scale``: each axis a multiple of 16 (UNETR's patch), at least 16."""
    return [int(max(16, 16 * math.ceil(r * scale / 16))) for r in roi]


def recipe_roi(recipe: str) -> list[int]:
    """``data.roi_size`` of ``+experiment=recipe`` (composed, not hard-coded: the configs are the truth)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={recipe}", "model.pretrained=null"])
    return [int(s) for s in cfg.data.roi_size]


def train_command(recipe: str, args: argparse.Namespace, data: Path, run_dir: Path, source: Path) -> list[str]:
    cases = args.cases
    overrides = [
        f"+experiment={recipe}", f"model={args.model}", f"data.root={data}", f"hydra.run.dir={run_dir}",
        # few cases: the rest of the split is the test split (one case at the default --cases 4)
        f"data.split.train={max(1, cases - 2)}", f"data.split.val={1 if cases >= 3 else 0}", "data.split.test=null",
        "data.split.files=null", f"data.batch_size={args.batch}", "data.num_workers=0",
        f"trainer.max_epochs={args.epochs}", f"trainer.val_interval={args.epochs}",
        f"trainer.checkpoint_interval={args.epochs}", f"trainer.epoch_length={args.steps or 'null'}",
        f"trainer.device={args.device}", "trainer.progress=false", "trainer.evaluate=false", f"seed={args.seed}",
    ]
    if args.scale != 1.0:
        overrides.append(f"data.roi_size=[{','.join(map(str, scaled_roi(recipe_roi(recipe), args.scale)))}]")
    if recipe != SOURCE:
        overrides.append(f"model.pretrained={source}")
    return [sys.executable, "-m", "tcurlora_seg.train", *overrides, *args.overrides]


def test_input(run_dir: Path) -> str | None:
    """The image of the first test case (else validation, else training) of the run's split.json."""
    path = run_dir / "split.json"
    if not path.is_file():
        return None
    split = json.loads(path.read_text())
    for name in ("test", "val", "train"):
        if split.get(name):
            image = split[name][0]["image"]
            return image if isinstance(image, str) else image[0]
    return None


def on_input_grid(mask: Path, image: str) -> bool:
    """Whether ``mask`` has the input file's spatial shape and affine."""
    import nibabel as nib
    import numpy as np

    ours, theirs = nib.load(mask), nib.load(image)
    return ours.shape == theirs.shape[:3] and bool(np.allclose(ours.affine, theirs.affine))


def recipe_steps(recipe: str, args: argparse.Namespace, data: Path, out: Path, source: Path,
                 run: Callable[..., dict[str, Any]] = run_step) -> list[dict[str, Any]]:
    """train -> evaluate -> predict -> export of one recipe; the later steps are skipped when training fails."""
    run_dir = out / "runs" / recipe
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("HYDRA_FULL_ERROR", None)
    logs = out / "logs"
    records = []
    train = run(train_command(recipe, args, data, run_dir, source), logs / f"{recipe}_train.log", env=env, timeout=args.timeout)
    records.append({"recipe": recipe, "step": "train", **train})
    stats = run_dir / "train_stats.json"
    if stats.is_file():
        records[-1]["train_stats"] = json.loads(stats.read_text())
    if train["exit_code"] != 0:
        reason = f"skipped: train exited {train['exit_code']}"
        return records + [{"recipe": recipe, "step": step, "skipped": reason} for step in STEPS[1:]]
    module = [sys.executable, "-m"]
    evaluate = run([*module, "tcurlora_seg.evaluate", f"run_dir={run_dir}", "progress=false", f"device={args.device}"],
                   logs / f"{recipe}_evaluate.log", env=env, timeout=args.timeout)
    summary = run_dir / "eval" / "summary.json"
    if evaluate["exit_code"] == 0 and summary.is_file():
        evaluate["test_foreground_mean"] = json.loads(summary.read_text()).get("foreground_mean")
    records.append({"recipe": recipe, "step": "evaluate", **evaluate})
    image = test_input(run_dir)
    masks = out / "predictions" / recipe
    predict = run([*module, "tcurlora_seg.predict", f"run_dir={run_dir}", f"input={image}", f"output={masks}",
                   "progress=false", f"device={args.device}"], logs / f"{recipe}_predict.log", env=env, timeout=args.timeout)
    written = sorted(masks.glob("*.nii.gz")) if masks.is_dir() else []
    if predict["exit_code"] == 0 and written:
        predict["input"], predict["mask"] = image, str(written[0])
        predict["mask_on_input_grid"] = on_input_grid(written[0], image)
    records.append({"recipe": recipe, "step": "predict", **predict})
    export = run([*module, "tcurlora_seg.export", f"run_dir={run_dir}", f"out={out / 'bundles' / recipe}"],
                 logs / f"{recipe}_export.log", env=env, timeout=args.timeout)
    records.append({"recipe": recipe, "step": "export", **export})
    return records


# --- report --------------------------------------------------------------------------------------------------------


def _note(record: dict[str, Any]) -> str:
    if "skipped" in record:
        return record["skipped"]
    parts = [*record.get("load_report", [])]
    if record.get("error"):
        parts.append(record["error"])
    mean = record.get("test_foreground_mean")
    if mean:
        parts.append(f"test Dice {mean['Dice']:.2f} %, HD95 {mean['HD95']:.2f} mm")
    if "mask_on_input_grid" in record:
        parts.append("mask on the input's grid" if record["mask_on_input_grid"] else "mask NOT on the input's grid")
    return "; ".join(parts).replace("|", "\\|")


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    rows = ["| recipe | step | exit | wall s | peak RSS MiB | load report / error / result |", "|---|---|---:|---:|---:|---|"]
    for r in report["steps"]:
        cells = [r["recipe"], r["step"], "" if r.get("exit_code") is None else str(r["exit_code"]),
                 f"{r['wall_s']:.1f}" if "wall_s" in r else "", f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "",
                 _note(r)]
        rows.append("| " + " | ".join(cells) + " |")
    head = [f"# Recipes on real-shaped fixtures{'' if report['complete'] else ' (incomplete)'}", "",
            f"Model `{settings['model']}`, scale {settings['scale']}, {settings['cases']} cases per dataset, "
            f"{settings['epochs']} epoch(s) of {settings['steps'] or 'one pass'} step(s) at batch {settings['batch']}, "
            f"device {settings['device']}. Peak RSS: {report['rss_method']}.", ""]
    commands = ["", "Commands:", "", *[f"- {r['recipe']} {r['step']}: `{r['command']}`" for r in report["steps"] if "command" in r], ""]
    return "\n".join(head + rows + commands)


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "recipes.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "recipes.md").write_text(markdown(report))


def run_all(args: argparse.Namespace, out: Path, run: Callable[..., dict[str, Any]] = run_step) -> dict[str, Any]:
    """Fixtures, then every recipe in ``args.recipes`` (the source first); the report after every recipe."""
    import platform

    out = out.resolve()  # the steps get absolute paths
    out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve() if args.data else out / "data"
    report: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rss_method": RSS_METHOD, "host": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "steps": [], "complete": False,
    }
    recipes = [r for r in RECIPES if r in args.recipes]
    if args.data is None:
        shapes = real_shapes()
        start = time.perf_counter()
        for recipe in recipes:
            shapes.write_dataset(recipe, data / recipe, cases=args.cases, seed=args.seed, scale=args.scale)
        report["fixtures_s"] = round(time.perf_counter() - start, 1)
    source = out / "runs" / SOURCE / "source_unetr.pt"
    if SOURCE not in recipes:
        source = Path(args.source) if args.source else source
    for recipe in recipes:
        report["steps"].extend(recipe_steps(recipe, args, data / recipe, out, source, run))
        write_report(report, out)
        last = [r for r in report["steps"] if r["recipe"] == recipe]
        print(f"{recipe}: " + ", ".join(f"{r['step']} {r.get('exit_code', '-')}" for r in last), flush=True)
    report["complete"] = True
    write_report(report, out)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unetr", help="configs/model/<name>.yaml (unetr: the paper's ViT-B; unetr_tiny)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--cases", type=int, default=4, help="cases per dataset: cases-2 train, 1 val, the rest test")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the fixtures' grids and the recipes' roi_size")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="trainer.epoch_length (default: one pass over the cases)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per step, then it is killed")
    parser.add_argument("--data", type=Path, default=None, help="fixtures written before (OUT/data of an earlier run)")
    parser.add_argument("--source", default=None, help="source model when --recipes leaves out brats")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/recipes/<time>")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every training run (after --)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    out = (args.out or Path("outputs") / "recipes" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    report = run_all(args, out)
    print((out / "recipes.md").read_text())
    failed = [f"{r['recipe']} {r['step']}" for r in report["steps"] if r.get("exit_code") not in (0, None)]
    print(f"report: {out / 'recipes.json'}, {out / 'recipes.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
