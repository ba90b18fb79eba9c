"""Compare fine-tuning methods side by side (the paper's Table 1) and ablate tCURLoRA's rank and tensor groups.

    python scripts/compare.py                       # every method x seeds 0 1 2 on the demo, then the ablation
    python scripts/compare.py --methods decoder_only lora tcurlora --seeds 0 1 --no-ablation
    python scripts/compare.py --experiment eadc -- data.root=PATH model.pretrained=PATH/source_unetr.pt
    python scripts/compare.py --ranks 4 8 --groups attn all -- trainer.max_epochs=100
    python scripts/compare.py -- hydra/launcher=submitit_slurm hydra.launcher.partition=gpu  # SLURM jobs
                                                    # (needs the hydra-submitit-launcher plugin)
    python scripts/compare.py --jobs 8              # 8 runs at a time on this machine (one GPU or many cores)
    python scripts/compare.py --collect-only outputs/compare/2025-01-01_12-00-00           # tables from finished runs

Underneath are Hydra multiruns of the real entry point, so any launcher works unchanged:
    python -m tcurlora_seg.train -m +experiment=E seed=0,1,2 peft=M1,M2,... [EXTRA] hydra.sweep.dir=OUT/runs
    python -m tcurlora_seg.train -m +experiment=E peft=tcurlora peft.rank=1,2,4,8,16 \\
        peft.groups=[attn,mlp_up,mlp_down] seed=0,1,2 [EXTRA] hydra.sweep.dir=OUT/ablation/rank
    python -m tcurlora_seg.train -m +experiment=E peft=tcurlora peft.rank=8 \\
        peft.groups=[attn],[mlp_up,mlp_down] seed=0,1,2 [EXTRA] hydra.sweep.dir=OUT/ablation/groups
With ``--jobs N`` (N > 1) the same runs go as single runs of the entry point, N at a time on this machine, into
the same folders (``OUT/<sweep>/<job>_<method>``, logs in ``OUT/logs/``), seed-major over all sweeps: every method
and ablation setting gets seed 0 before any gets seed 1. The first run goes alone (it pretrains the demo's source
model when that is not cached, which the others then share), and each run gets ``OMP_NUM_THREADS`` = cores / N
unless that is set. A failed run does not stop the others; its sweep is reported as failed.
The ablation varies one factor at a time (rank with all three tensors; tensor groups at rank 8); ``--grid`` runs
every rank x group setting instead, in OUT/ablation/grid. The comparison's own tCURLoRA runs (rank 8, all tensors,
unless overridden after ``--``) are not run again by the one-factor ablation: its table takes them in from OUT/runs.
Everything after ``--`` is passed to both as Hydra overrides (they come last, so they win). Runs evaluate their test
split (``trainer.evaluate=true`` is added); the paper's protocol (softmax of the last 4 epochs, components under
1 cm³ removed) is ``-- trainer.eval_average_last=4 trainer.eval_min_component_mm3=1000``. Each method runs with its own defaults (``configs/peft/``); a ``peft.*``
override after ``--`` reaches every method, and those without that key (full, decoder_only) stop on it.

From every run folder it reads ``config.yaml`` (method, rank, groups, seed), ``eval/summary.json`` (foreground-mean
Dice % and HD95 mm on the test split), ``train_stats.json`` (trainable parameters, mean seconds per training step
without data loading or validation, peak memory: GPU max allocated, CPU max RSS) and the size of
``checkpoints/best.pt`` (the adapter file), and measures how far the run moved the ViT (``ViT change %``:
‖W_tuned − W_start‖ / ‖W_start‖ over the blocks' weight matrices, ΔW merged; cached in ``eval/vit_change.json``):
an adapter with a ViT change near 0 % has trained as decoder-only. It writes into OUT (default ``outputs/compare/<time>``):
    comparison.csv / ablation.csv    one row per run
    comparison.md  / ablation.md     mean ± sample std over seeds per method (per rank x groups), also printed;
                                     with decoder-only among the runs also Δ Dice vs decoder-only, paired by seed
                                     (the same data stream: common random numbers), and at how many seeds it is above
    comparison.png / ablation.png    Dice vs trainable parameters (log x) / Dice vs rank, error bars = std over seeds;
                                     beside it the paired Δ Dice vs decoder-only the same way
The demo pretrains its source model in the first run when it is not cached; on a cluster, where runs start
together, run ``python -m tcurlora_seg.train +experiment=demo_source`` once first.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tcurlora_seg.errors import UserError  # noqa: E402

# The order of the paper's Table 1: references first, the rivals, tCURLoRA last.
METHODS = ["full", "decoder_only", "lora", "dora", "pissa", "loha", "lokr", "curlora", "lora_pt", "tcurlora"]
RANKS = [1, 2, 4, 8, 16]
GROUPS = {"attn": ["attn"], "mlp": ["mlp_up", "mlp_down"], "all": ["attn", "mlp_up", "mlp_down"]}
# The paired baseline: every method trains the decoder as decoder-only does, plus its own part of the encoder, and
# with common random numbers (the trainer reseeds after building the model; the training loader has a generator of
# its own) a seed gives every method the same case order, crops and flips, so Dice minus decoder-only's Dice at the
# same seed is the method's own effect (and, for methods that draw random numbers in their forward pass, such as
# peft's LoHa and LoKr, that of their other ViT dropout masks).
REFERENCE = "decoder_only"
PAIRED = "dice_vs_decoder_only"
FIELDS = ["method", "rank", "groups", "seed", "dice", PAIRED, "hd95", "vit_change_pct", "trainable", "adapter_mb",
          "step_time_s", "peak_memory_mb", "run_dir"]
METRICS = ["trainable", "adapter_mb", "dice", PAIRED, "hd95", "vit_change_pct", "step_time_s", "peak_memory_mb"]
# (header, metric, scale, decimals, ± std) of the Markdown tables. Sizes are fixed by the method, so no ± for them.
# The ablation counts parameters one by one: ranks differ by a few hundred parameters next to the decoder's millions.
# ("above decoder-only" is a count, "k/n seeds", not a mean.)
_REST = [("adapter MB", "adapter_mb", 1, 2, False), ("Dice %", "dice", 1, 2, True),
         ("Δ Dice vs decoder-only", PAIRED, 1, 2, True, True), ("above decoder-only", "above_reference"),
         ("HD95 mm", "hd95", 1, 2, True),
         ("ViT change %", "vit_change_pct", 1, 2, True), ("s/step", "step_time_s", 1, 3, True),
         ("peak MB", "peak_memory_mb", 1, 0, True)]
COLUMNS = {"comparison": [("trainable params (M)", "trainable", 1e-6, 3, False), *_REST],
           "ablation": [("trainable params", "trainable", 1, 0, False), *_REST]}
SWEEPS = {"runs": "comparison", "ablation": "ablation"}  # sweep folder -> output stem
KEYS = {"comparison": ["method"], "ablation": ["rank", "groups"]}


# --- the sweeps ---------------------------------------------------------------------------------------------------

def hydra_list(values: Sequence[str]) -> str:
    return "[" + ",".join(values) + "]"


def comparison_overrides(methods: Sequence[str], seeds: Sequence[int], experiment: str) -> list[str]:
    # Hydra varies the first sweep override slowest: seed first runs every method once before any second seed, so
    # a sweep stopped part-way still compares every method
    return [f"+experiment={experiment}", f"seed={','.join(map(str, seeds))}", f"peft={','.join(methods)}"]


def ablation_overrides(ranks: Sequence[int], groups: Sequence[str], seeds: Sequence[int], experiment: str) -> list[str]:
    """One tCURLoRA multirun over ranks x group settings (the full grid when both have several values)."""
    # Hydra sweeps over lists with comma-separated list literals: peft.groups=[attn],[mlp_up,mlp_down]
    return [f"+experiment={experiment}", "peft=tcurlora", f"peft.rank={','.join(map(str, ranks))}",
            f"peft.groups={','.join(hydra_list(GROUPS[g]) for g in groups)}", f"seed={','.join(map(str, seeds))}"]


def ablation_sweeps(ranks: Sequence[int], groups: Sequence[str], seeds: Sequence[int], experiment: str,
                    groups_rank: int, grid: bool, done: Sequence[tuple[int, str]] = ()) -> dict[str, list[str]]:
    """The ablation's multiruns, by sub-folder of ``ablation/``.

    By default one factor at a time: every rank with all three tensors, then the other group settings at
    ``groups_rank`` (the paper's r = 8); the grid costs ranks x groups runs per seed instead of ranks + groups - 1.
    ``done``: (rank, group setting) pairs that run elsewhere with the same seeds (the comparison's own tCURLoRA runs,
    which the ablation table takes in), left out of the one-factor sweeps; the grid is one product and keeps them.
    """
    if grid:
        return {"grid": ablation_overrides(ranks, groups, seeds, experiment)}
    sweeps = {}
    rank_sweep = [r for r in ranks if (r, "all") not in done]
    if rank_sweep:
        sweeps["rank"] = ablation_overrides(rank_sweep, ["all"], seeds, experiment)
    covered = {*done, *((r, "all") for r in ranks)}
    others = [g for g in groups if (groups_rank, g) not in covered]
    if others:
        sweeps["groups"] = ablation_overrides([groups_rank], others, seeds, experiment)
    return sweeps


def comparison_setting(experiment: str, extra: Sequence[str]) -> tuple[int, str] | None:
    """(rank, group setting) that the comparison's tCURLoRA runs use: its config with the experiment and the extra
    overrides (launcher and other ``hydra`` keys aside); None when the tensors are not one of GROUPS' settings or the
    overrides do not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    overrides = [f"+experiment={experiment}", "peft=tcurlora", *(o for o in extra if not o.lstrip("+~").startswith("hydra"))]
    try:
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            peft = compose("train", overrides=overrides).peft
        rank, groups = int(peft.rank), list(peft.groups)
    except (HydraException, ValueError, TypeError):  # a bad override: every run stops on it with its own one-line error
        return None
    name = next((g for g, tensors in GROUPS.items() if groups == tensors), None)
    return (rank, name) if name else None


def train_command(overrides: Sequence[str], extra: Sequence[str], folder: str) -> list[str]:
    """The entry point with ``overrides`` and its test evaluation; ``extra`` come last (they win), then the folder."""
    return [sys.executable, "-m", "tcurlora_seg.train", *overrides, "trainer.evaluate=true", *extra, folder]


def child_env() -> dict[str, str]:
    """This environment with the repository importable (the runs start from any working directory)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_sweep(overrides: Sequence[str], extra: Sequence[str], sweep_dir: Path) -> int:
    """One Hydra multirun of ``tcurlora_seg.train`` into ``sweep_dir``; returns its exit code."""
    command = train_command(["-m", *overrides], extra, f"hydra.sweep.dir={sweep_dir}")
    print("$ " + shlex.join(command), flush=True)
    return subprocess.run(command, env=child_env()).returncode


def expand(overrides: Sequence[str]) -> list[list[str]]:
    """The single runs of a Hydra sweep, in the order of Hydra's basic sweeper (the first sweep key varies slowest)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in OverridesParser.create().parse_overrides(list(overrides))]
    return [list(run) for run in itertools.product(*choices)]


def _value(run: Sequence[str], key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in run if o.split("=", 1)[0] == key), None)


def job_queue(sweeps: dict[str, list[str]]) -> list[tuple[str, int, list[str]]]:
    """(sweep, job number, overrides) of every run, seed-major over all sweeps (then sweep order, then job order)."""
    queue = [(name, num, run) for name, overrides in sweeps.items() for num, run in enumerate(expand(overrides))]
    seeds = list(dict.fromkeys(_value(run, "seed") for _, _, run in queue))
    return sorted(queue, key=lambda job: seeds.index(_value(job[2], "seed")))  # stable: the rest keeps its order


def run_parallel(sweeps: dict[str, list[str]], extra: Sequence[str], out: Path, jobs: int) -> list[str]:
    """Every run of ``sweeps`` as a single run, ``jobs`` at a time; returns the sweeps with a failed run."""
    queue = job_queue(sweeps)
    cores = os.cpu_count() or 1
    alone = child_env()  # the first run has the machine to itself, unless the user fixed the threads
    alone.setdefault("OMP_NUM_THREADS", str(cores))
    shared = child_env()
    shared.setdefault("OMP_NUM_THREADS", str(max(1, cores // jobs)))  # N runs share the cores
    (out / "logs").mkdir(parents=True, exist_ok=True)
    failed: set[str] = set()
    done = itertools.count(1)

    def run_one(job: tuple[str, int, list[str]], env: dict[str, str] = shared) -> None:
        name, num, overrides = job
        run_dir = (out / name / f"{num}_{_value(overrides, 'peft') or 'run'}").resolve()
        log = out / "logs" / f"{name.replace('/', '-')}_{num}.log"
        command = train_command([*overrides, "trainer.progress=false"], extra, f"hydra.run.dir={run_dir}")
        start = time.monotonic()
        with log.open("w") as f:
            f.write("$ " + shlex.join(command) + "\n")
            f.flush()
            code = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        status = "done" if code == 0 else f"FAILED (exit {code}, log {log})"
        if code != 0:
            failed.add(name)
        print(f"[{next(done)}/{len(queue)}] {run_dir.relative_to(out.resolve())} {' '.join(overrides[1:])}: {status} "
              f"in {time.monotonic() - start:.0f} s", flush=True)

    print(f"{len(queue)} runs, {jobs} at a time, logs in {out / 'logs'}", flush=True)
    run_one(queue[0], alone)  # alone: it may pretrain the demo's source model, which every later run loads
    with ThreadPoolExecutor(jobs) as pool:
        # on Ctrl-C, map cancels the queued runs; the running ones got the Ctrl-C too and save their checkpoints
        list(pool.map(run_one, queue[1:]))
    return [name for name in sweeps if name in failed]


# --- collecting run folders ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect_run(run_dir: Path) -> dict:
    """One row of comparison.csv from a run folder; missing files leave their fields empty (None)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    peft = cfg["peft"]
    summary = _read_json(run_dir / "eval" / "summary.json").get("foreground_mean", {})
    stats = _read_json(run_dir / "train_stats.json")
    best = run_dir / "checkpoints" / "best.pt"
    if not summary:
        print(f"warning: {run_dir} has no eval/summary.json (unfinished, or trained with trainer.evaluate=false: "
              f"make eval RUN={run_dir})", file=sys.stderr)
    return {
        "method": peft["name"],
        "rank": peft.get("rank"),
        "groups": "+".join(peft["groups"]) if peft.get("groups") else None,
        "seed": cfg["seed"],
        "dice": summary.get("Dice"),
        "hd95": summary.get("HD95"),
        "vit_change_pct": vit_change_of(run_dir) if best.is_file() else None,
        "trainable": stats.get("trainable"),
        "adapter_mb": best.stat().st_size / 2**20 if best.is_file() else None,
        "step_time_s": stats.get("step_time_s"),
        "peak_memory_mb": stats.get("peak_memory_mb"),
        "run_dir": str(run_dir),
    }


def vit_change_of(run_dir: Path) -> float | None:
    """``run.vit_change`` of the run's best checkpoint, cached in ``eval/vit_change.json`` (it rebuilds two models).

    None, with a warning, when the run cannot be rebuilt here (e.g. its source model is not on this machine)."""
    from tcurlora_seg.engine.run import vit_change

    best, cache = run_dir / "checkpoints" / "best.pt", run_dir / "eval" / "vit_change.json"
    stamp = best.stat().st_mtime_ns
    found = _read_json(cache)
    if found.get("best_mtime_ns") == stamp:
        return found["vit_change_pct"]
    try:
        value = vit_change(run_dir)
    except UserError as err:
        print(f"warning: {run_dir}: no ViT change ({err})", file=sys.stderr)
        return None
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps({"vit_change_pct": value, "best_mtime_ns": stamp}) + "\n")
    return value


def run_folders(sweep_dir: Path) -> list[Path]:
    """The run folders under a sweep folder (its sub-sweeps too), in job order (Hydra's .hydra/config.yaml is not one)."""
    runs = [p.parent for p in sweep_dir.glob("**/config.yaml") if p.parent.name != ".hydra"]
    job = lambda p: int(p.name.split("_")[0]) if p.name.split("_")[0].isdigit() else 0  # noqa: E731
    return sorted(runs, key=lambda p: (str(p.parent), job(p), p.name))


# --- aggregation and outputs --------------------------------------------------------------------------------------

def _values(rows: Sequence[dict], metric: str) -> list[float]:
    values = [row.get(metric) for row in rows]
    return [float(v) for v in values if v not in (None, "") and not math.isnan(float(v))]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, as over seeds); NaN where undefined."""
    mean = statistics.fmean(values) if values else math.nan
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """One entry per distinct ``keys`` value (first-seen order): the keys, ``n`` evaluated runs (an unfinished run
    has no Dice and does not count) and (mean, std) per metric."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return [{**dict(zip(keys, key)), "n": len(_values(members, "dice")), **{m: mean_std(_values(members, m)) for m in METRICS},
             "above_reference": above(_values(members, PAIRED))}
            for key, members in groups.items()]


def above(deltas: Sequence[float]) -> str:
    """"k/n": at how many of the n paired seeds the method beat decoder-only; "–" without pairs."""
    return f"{sum(d > 0 for d in deltas)}/{len(deltas)}" if deltas else "–"


def pair_with_reference(rows: Sequence[dict], reference: Sequence[dict]) -> None:
    """Set each row's ``PAIRED``: its Dice minus the Dice of the ``REFERENCE`` run of the same seed in ``reference``.

    None where either Dice is missing, for seeds that decoder-only did not run, and for decoder-only itself (0 by
    definition, and its own spread is the one the others are paired against)."""
    dice = {str(r["seed"]): float(r["dice"]) for r in reference
            if r["method"] == REFERENCE and r.get("dice") not in (None, "")}
    for row in rows:
        partner = dice.get(str(row["seed"]))
        paired = row["method"] != REFERENCE and partner is not None and row.get("dice") not in (None, "")
        row[PAIRED] = float(row["dice"]) - partner if paired else None


def cell(stat: tuple[float, float], scale: float, decimals: int, spread: bool = True, signed: bool = False) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:{'+' if signed else ''},.{decimals}f}"
    return text if math.isnan(std) or not spread else f"{text} ± {std * scale:,.{decimals}f}"


def markdown(entries: Sequence[dict], keys: Sequence[str], columns: Sequence[tuple] = COLUMNS["comparison"]) -> str:
    headers = [*keys, *(c[0] for c in columns), "n seeds"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(keys) + "---:|" * (len(columns) + 1)]
    for entry in entries:
        cells = [str(entry[k]) for k in keys] + [cell(entry[m], *fmt) if fmt else entry[m] for _, m, *fmt in columns]
        lines.append("| " + " | ".join([*cells, str(entry["n"])]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(ax, axis: str = "x") -> None:
    """Log-axis ticks as 0.5, 2, 16 rather than 5×10⁻¹; minor ticks labelled too when the range is under a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    getattr(ax, f"{axis}axis").set_major_formatter(plain)
    getattr(ax, f"{axis}axis").set_minor_formatter(plain if hi / lo < 10 else NullFormatter())


def plot_comparison(entries: Sequence[dict], path: Path) -> None:
    """Dice vs trainable parameters (log x), one point per method, error bars = std of Dice over seeds; beside it,
    when decoder-only ran with the same seeds, Δ Dice vs decoder-only paired by seed, one row per method (its much
    smaller spread is what separates a method from decoder-only)."""
    _figure(path, _method_panel, _paired_rows, entries, [e for e in entries if e["method"] != REFERENCE],
            "Dice vs trainable parameters (mean ± std over seeds)")


def _figure(path: Path, panel, paired_panel, entries: Sequence[dict], paired_entries: Sequence[dict], title: str) -> None:
    """``panel`` of the Dice, and beside it, where any entry has a paired Δ Dice, ``paired_panel`` of that."""
    plt = _pyplot()
    paired = any(not math.isnan(e[PAIRED][0]) for e in paired_entries)
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(13 if paired else 6.5, 4.5), squeeze=False)
    panel(axes[0, 0], entries, "dice", "test Dice (%)", title)
    if paired:
        paired_panel(axes[0, 1], paired_entries, PAIRED, "Δ test Dice vs decoder-only (points)",
                     "paired by seed: Dice − decoder-only's (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _style(method: str) -> dict:
    """One colour and marker per method, the same in both panels and in every plot."""
    i = METHODS.index(method) if method in METHODS else len(METHODS)
    return {"color": f"C{i % 10}", "marker": "osD^v<>ph*"[i % 10]}


def _method_panel(ax, entries: Sequence[dict], metric: str, ylabel: str, title: str) -> None:
    # a legend, not labels at the points: methods of about the same size (decoder-only, CURLoRA, tCURLoRA, LoKr)
    # share an x, and their labels would print over each other
    for entry in entries:
        (params, _), (value, std) = entry["trainable"], entry[metric]
        if math.isnan(params) or math.isnan(value):
            continue
        ax.errorbar(params / 1e6, value, yerr=0.0 if math.isnan(std) else std, linestyle="none", capsize=3,
                    label=entry["method"], **_style(entry["method"]))
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    if hi / lo < 4:  # methods of near-equal size: widen around them, a log axis needs some ticks to label
        ax.set_xlim(math.sqrt(lo * hi) / 2, math.sqrt(lo * hi) * 2)
    ax.set(xlabel="trainable parameters (M, log scale)", ylabel=ylabel, title=title)
    _plain_ticks(ax)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)


def _paired_rows(ax, entries: Sequence[dict], metric: str, xlabel: str, title: str) -> None:
    """One row per method (the table's order, top down), mean ± std of the paired difference, a line at 0."""
    rows = [e for e in entries if not math.isnan(e[metric][0])]
    for y, entry in enumerate(reversed(rows)):
        value, std = entry[metric]
        ax.errorbar(value, y, xerr=0.0 if math.isnan(std) else std, linestyle="none", capsize=3,
                    **_style(entry["method"]))
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(range(len(rows)), [e["method"] for e in reversed(rows)])
    ax.set(xlabel=xlabel, title=title)
    ax.grid(True, axis="x", alpha=0.3)


def plot_ablation(entries: Sequence[dict], path: Path) -> None:
    """tCURLoRA Dice vs rank (log2 x), one line per tensor-group setting, error bars = std over seeds; beside it,
    when the comparison's decoder-only ran with the same seeds, Δ Dice vs decoder-only paired by seed."""
    _figure(path, _rank_panel, _rank_panel, entries, entries, "tCURLoRA: rank and tensor groups (mean ± std over seeds)")


def _rank_panel(ax, entries: Sequence[dict], metric: str, ylabel: str, title: str) -> None:
    if metric == PAIRED:
        ax.axhline(0.0, color="grey", linewidth=1)
    settings = list(dict.fromkeys(e["groups"] for e in entries))
    for i, groups in enumerate(settings):
        mine = [e for e in entries if e["groups"] == groups and not math.isnan(e[metric][0])]
        points = sorted((int(e["rank"]), *e[metric]) for e in mine)  # (rank, mean, std)
        if points:
            ranks, mean, std = zip(*points)
            shift = 2 ** (0.06 * (i - (len(settings) - 1) / 2))  # settings at the same rank side by side, not on top
            ax.errorbar([r * shift for r in ranks], mean, yerr=[0.0 if math.isnan(s) else s for s in std], marker="o",
                        capsize=3, label=groups)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(e["rank"]) for e in entries}))
    _plain_ticks(ax)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set(xlabel="rank r", ylabel=ylabel, title=title)
    ax.legend(title="groups")
    ax.grid(True, which="both", alpha=0.3)


def sweep_rows(out: Path, folder: str, stem: str, comparison: Sequence[dict] = ()) -> list[dict]:
    """The rows of one output (``stem``) from its sweep ``folder``; the ablation also takes in the comparison's
    tCURLoRA rows (the setting it left out to not run them twice), unless it ran the same setting and seed itself."""
    rows = [collect_run(run) for run in run_folders(out / folder)]
    if stem == "ablation" and rows:
        key = lambda r: (str(r["rank"]), r["groups"], str(r["seed"]))  # noqa: E731
        have = {key(r) for r in rows}
        rows += [r for r in comparison if r["method"] == "tcurlora" and key(r) not in have]
    return rows


def report(out: Path) -> list[Path]:
    """Collect every sweep folder of ``out`` into its CSV, Markdown table and plot; print the tables."""
    written = []
    collected: dict[str, list[dict]] = {}
    for folder, stem in SWEEPS.items():  # the comparison first: the ablation takes in its tCURLoRA rows
        rows = collected[stem] = sweep_rows(out, folder, stem, collected.get("comparison", ()))
        if not rows:
            continue
        pair_with_reference(rows, collected.get("comparison", ()))  # the ablation pairs with the comparison's runs
        entries = aggregate(rows, KEYS[stem])
        if stem == "ablation":  # grouped by tensor setting, ranks ascending, whatever order the sub-sweeps ran in
            entries.sort(key=lambda e: (e["groups"] or "", int(e["rank"])))
        else:  # the paper's order, also for runs collected from several sweeps (e.g. methods split over machines)
            entries.sort(key=lambda e: METHODS.index(e["method"]) if e["method"] in METHODS else len(METHODS))
        columns = COLUMNS[stem]
        if not any(row[PAIRED] is not None for row in rows):  # no decoder-only runs of the same seeds to pair with
            columns = [c for c in columns if c[1] not in (PAIRED, "above_reference")]
        table = markdown(entries, KEYS[stem], columns)
        write_csv(rows, out / f"{stem}.csv")
        (out / f"{stem}.md").write_text(table)
        (plot_comparison if stem == "comparison" else plot_ablation)(entries, out / f"{stem}.png")
        print(f"\n{stem} ({len(rows)} runs, {out / stem}.csv/.md/.png)\n{table}", flush=True)
        written += [out / f"{stem}.{ext}" for ext in ("csv", "md", "png")]
    if not written:
        raise UserError(f"no run folders under {out}/runs or {out}/ablation; pass the OUT folder that compare.py wrote")
    return written


# --- command line -------------------------------------------------------------------------------------------------

def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Hydra overrides for every run go after --, e.g. -- trainer.max_epochs=100")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, metavar="METHOD",
                        help=f"methods to compare (default: all: {' '.join(METHODS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per method (default: 0 1 2)")
    parser.add_argument("--experiment", default="demo", help="configs/experiment/ name (default: demo, the demo target task)")
    parser.add_argument("--ranks", nargs="+", type=int, default=RANKS, help="ablation: tCURLoRA ranks (default: 1 2 4 8 16)")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS),
                        help="ablation: tensor groups, attn | mlp (up + down) | all (default: all three settings)")
    parser.add_argument("--groups-rank", type=int, default=8,
                        help="ablation: the rank at which the group settings are compared (default: 8, the paper's)")
    parser.add_argument("--grid", action="store_true",
                        help="ablation: every rank x every group setting (default: one factor at a time)")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the tCURLoRA ablation")
    parser.add_argument("--no-comparison", dest="comparison", action="store_false",
                        help="skip the comparison of methods (only the ablation)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time on this machine (default 1: Hydra multiruns, any launcher)")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/compare/<time>)")
    parser.add_argument("--collect-only", type=Path, metavar="OUT", help="only collect the runs already in OUT (no training)")
    return parser.parse_args(argv), extra


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: give 1 or more runs at a time", file=sys.stderr)
        return 2
    if not (args.comparison or args.ablation or args.collect_only):
        print("error: --no-comparison with --no-ablation leaves nothing to run; drop one of them", file=sys.stderr)
        return 2
    out = args.collect_only or args.out or Path("outputs/compare") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    failed = []
    if args.collect_only is None:
        out.mkdir(parents=True, exist_ok=True)
        sweeps = {"runs": comparison_overrides(args.methods, args.seeds, args.experiment)} if args.comparison else {}
        if args.ablation:
            shared = [comparison_setting(args.experiment, extra)] if args.comparison and "tcurlora" in args.methods else []
            ablation = ablation_sweeps(args.ranks, args.groups, args.seeds, args.experiment, args.groups_rank, args.grid,
                                       done=[s for s in shared if s])
            sweeps.update({f"ablation/{name}": overrides for name, overrides in ablation.items()})
        if args.jobs > 1:
            try:
                failed = run_parallel(sweeps, extra, out, args.jobs)
            except KeyboardInterrupt:
                print(f"stopped by Ctrl-C; the runs that finished are in {out}: python scripts/compare.py "
                      f"--collect-only {out}", file=sys.stderr)
                return 130
        else:
            failed = [name for name, overrides in sweeps.items() if run_sweep(overrides, extra, (out / name).resolve()) != 0]
    problem = None
    try:
        report(out)
    except UserError as err:
        problem = str(err)
    if failed:  # what finished is reported above; the rest can be collected once it is rerun or done
        problem = (f"sweeps failed: {', '.join(failed)} (see the output above); the tables hold the runs that "
                   f"finished; fix it and rerun, or collect later with --collect-only {out}")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
