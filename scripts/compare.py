"""Compare fine-tuning methods side by side (the paper's Table 1) and ablate tCURLoRA's rank and tensor groups.

    python scripts/compare.py                       # every method x seeds 0 1 2 on the demo, then the ablation
    python scripts/compare.py --methods decoder_only lora tcurlora --seeds 0 1 --no-ablation
    python scripts/compare.py --experiment eadc -- data.root=PATH model.pretrained=PATH/source_unetr.pt
    python scripts/compare.py --ranks 4 8 --groups attn all -- trainer.max_epochs=100
    python scripts/compare.py -- hydra/launcher=submitit_slurm hydra.launcher.partition=gpu  # SLURM jobs
                                                    # (needs the hydra-submitit-launcher plugin)
    python scripts/compare.py --jobs 8              # 8 runs at a time on this machine (one GPU or many cores)
    python scripts/compare.py --collect-only outputs/compare/2025-01-01_12-00-00           # tables from finished runs
    python scripts/compare.py --adapter-lrs --lrs 1e-4 1e-3 --tune-seeds 0   # every method at its own lr (validation)

Learning rates (``--adapter-lrs [LR ...]``, ``--lrs LR ...``, ``--tune-seeds SEED ...``): at one shared lr a step moves
each method's ΔW by very different amounts, so a table at one lr ranks lr scale, not methods. With ``--lrs`` the
shared decoder lr (``optim.lr``) is chosen first, by decoder-only's best validation Dice over the tuning seeds
(``OUT/runs/tune_lr``); then every other method runs at every adapter lr of the grid (``optim.adapter_lr``, default
1e-4 ... 1e-1 in half decades) on the tuning seeds (``OUT/runs/tune``) and keeps the one with the highest mean
validation Dice (ties: the grid's first); then each method runs at its own lr on the remaining seeds
(``OUT/runs/final/<method>``). The test split never takes part in a choice. ``comparison.csv`` has every run with
its ``lr``, ``adapter_lr``, ``val_dice`` and ``selected``; the tables and plots hold the selected runs only and name
the lr; ``tuning.png`` plots validation Dice vs lr. The ablation and the attribution sweep run at the chosen lrs.
Every table has a ``zero_shot`` row (the pretrained model on the same test cases, from the runs' eval_pretrained/)
and each method's Δ Dice vs zero-shot, paired by seed. The attribution sweep (``OUT/attribution``, skipped with
``--no-attribution`` or ``--no-ablation``) trains one frozen part fully on top of decoder-only (the skip encoders
encoder1..4, the patch embedding, the ViT blocks) and the skip encoders on top of tCURLoRA (``peft.train_extra``, at
the decoder's lr), beside the comparison's decoder-only and full: which part the gap to full fine-tuning comes from.

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
unless that is set. A failed run does not stop the others; its sweep is reported as failed. The first run of
each seed evaluates the zero-shot model, the others skip it (it is the same model on the same cases). Called again
with the same ``--out``, runs that finished with the same settings are kept, a run stopped part-way continues from
its last checkpoint (``trainer.resume=auto``, also for Hydra multiruns), so a long comparison spans sessions.
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
    attribution.csv / .md            the attribution sweep's runs and table
    tuning.json / tuning.png         the lr grids and tuning seeds; validation Dice vs lr (with --adapter-lrs)
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
# The pretrained source model itself, evaluated by every run on the same test split before it trains
# (eval_pretrained/): one row per seed in every table, so that a method below it shows as such.
ZERO_SHOT = "zero_shot"
VS_ZERO_SHOT = "dice_vs_zero_shot"
FIELDS = ["method", "setting", "rank", "groups", "seed", "lr", "adapter_lr", "val_dice", "selected", "dice", PAIRED, VS_ZERO_SHOT,
          "hd95", "vit_change_pct", "trainable", "adapter_mb", "step_time_s", "peak_memory_mb", "run_dir"]
METRICS = ["trainable", "adapter_mb", "dice", PAIRED, VS_ZERO_SHOT, "hd95", "vit_change_pct", "step_time_s",
           "peak_memory_mb"]
# The default adapter-lr grid of --adapter-lrs with no values: 1e-4 ... 1e-1 in half decades.
ADAPTER_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
# (header, metric, scale, decimals, ± std) of the Markdown tables. Sizes are fixed by the method, so no ± for them.
# The ablation counts parameters one by one: ranks differ by a few hundred parameters next to the decoder's millions.
# ("above decoder-only" is a count, "k/n seeds", not a mean.)
_REST = [("adapter MB", "adapter_mb", 1, 2, False), ("Dice %", "dice", 1, 2, True),
         ("Δ Dice vs decoder-only", PAIRED, 1, 2, True, True), ("above decoder-only", "above_reference"),
         ("Δ Dice vs zero-shot", VS_ZERO_SHOT, 1, 2, True, True),
         ("HD95 mm", "hd95", 1, 2, True),
         ("ViT change %", "vit_change_pct", 1, 2, True), ("s/step", "step_time_s", 1, 3, True),
         ("peak MB", "peak_memory_mb", 1, 0, True)]
COLUMNS = {"comparison": [("lr", "lr_cell"), ("adapter lr", "adapter_lr_cell"),
                          ("trainable params (M)", "trainable", 1e-6, 3, False), *_REST],
           "ablation": [("trainable params", "trainable", 1, 0, False), *_REST]}
COLUMNS["attribution"] = COLUMNS["comparison"]
SWEEPS = {"runs": "comparison", "ablation": "ablation", "attribution": "attribution"}  # sweep folder -> output stem
KEYS = {"comparison": ["method"], "ablation": ["rank", "groups"], "attribution": ["setting"]}
# Where full fine-tuning's gain comes from: one frozen part at a time trains fully (peft.train_extra, at the decoder's
# lr) on top of decoder-only or tCURLoRA; the table sets them beside the comparison's decoder-only and full runs.
SKIP_ENCODERS = ["encoder1", "encoder2", "encoder3", "encoder4"]
ATTRIBUTION = {"decoder_only+skip_encoders": ("decoder_only", SKIP_ENCODERS),
               "decoder_only+patch_embedding": ("decoder_only", ["vit.patch_embedding"]),
               "decoder_only+vit_blocks": ("decoder_only", ["vit.blocks"]),
               "tcurlora+skip_encoders": ("tcurlora", SKIP_ENCODERS)}


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


def run_config(experiment: str, extra: Sequence[str], *overrides: str):
    """The config a run of ``experiment`` composes with ``overrides`` and the extra ones (launcher and other ``hydra``
    keys aside); None when they do not compose (every run then stops on them with its own one-line error)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    given = [f"+experiment={experiment}", *overrides, *(o for o in extra if not o.lstrip("+~").startswith("hydra"))]
    try:
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            return compose("train", overrides=given)
    except (HydraException, ValueError, TypeError):
        return None


def comparison_setting(experiment: str, extra: Sequence[str]) -> tuple[int, str] | None:
    """(rank, group setting) that the comparison's tCURLoRA runs use: its config with the experiment and the extra
    overrides; None when the tensors are not one of GROUPS' settings or the overrides do not compose."""
    cfg = run_config(experiment, extra, "peft=tcurlora")
    try:
        rank, groups = int(cfg.peft.rank), list(cfg.peft.groups)
    except (AttributeError, ValueError, TypeError):  # a bad override: every run stops on it with its own one-line error
        return None
    name = next((g for g, tensors in GROUPS.items() if groups == tensors), None)
    return (rank, name) if name else None


def train_command(overrides: Sequence[str], extra: Sequence[str], folder: str) -> list[str]:
    """The entry point with ``overrides`` and its test evaluation; ``extra`` come last (they win), then the folder.

    ``trainer.resume=auto``: rerun into the same ``--out``, a run stopped part-way (Ctrl-C, a session's end)
    continues from its last checkpoint, a finished one is not trained again."""
    return [sys.executable, "-m", "tcurlora_seg.train", *overrides, "trainer.evaluate=true", "trainer.resume=auto",
            *extra, folder]


# Overrides that do not change what a run trains and measures: a finished run with other values of these is the
# same run (compare.py sets them itself, or the user's launcher does)
RUN_FREE = {"trainer.progress", "trainer.evaluate", "trainer.evaluate_pretrained", "trainer.resume",
            "trainer.device", "data.num_workers"}


def settings(overrides: Sequence[str]) -> set[str]:
    return {o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in RUN_FREE and not o.startswith("hydra")}


def finished_earlier(run_dir: Path, overrides: Sequence[str]) -> bool:
    """Whether ``run_dir`` holds a finished, evaluated run of these settings (from an earlier call with this --out).

    A folder of other settings is not: its run starts again there and stops on the resume check's one-line error."""
    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not ((run_dir / "eval" / "summary.json").is_file() and recorded.is_file()):
        return False
    from omegaconf import OmegaConf

    return settings(OmegaConf.load(recorded)) == settings(overrides)


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
    folder = lambda name, num, overrides: (out / name / f"{num}_{_value(overrides, 'peft') or 'run'}").resolve()  # noqa: E731
    earlier = [job for job in queue if finished_earlier(folder(*job), [*job[2], *extra])]
    queue = [job for job in queue if job not in earlier]
    # the zero-shot model is the same for every run of a seed: the first run of each seed evaluates it, the others
    # skip it (~20 % of a demo run)
    zero_shot = {_value(run, "seed") for name, num, run in earlier
                 if (folder(name, num, run) / "eval_pretrained" / "summary.json").is_file()}
    first_of_seed = set()
    for name, num, run in queue:
        if _value(run, "seed") not in zero_shot:
            zero_shot.add(_value(run, "seed"))
            first_of_seed.add((name, num))

    def run_one(job: tuple[str, int, list[str]], env: dict[str, str] = shared) -> None:
        name, num, overrides = job
        run_dir = folder(*job)
        log = out / "logs" / f"{name.replace('/', '-')}_{num}.log"
        own = ["trainer.progress=false", *([] if (name, num) in first_of_seed else ["trainer.evaluate_pretrained=false"])]
        command = train_command([*overrides, *own], extra, f"hydra.run.dir={run_dir}")
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

    if earlier:
        print(f"{len(earlier)} runs finished earlier in {out} (kept)", flush=True)
    if not queue:
        return []
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
    before = _read_json(run_dir / "eval_pretrained" / "summary.json").get("foreground_mean", {})
    stats = _read_json(run_dir / "train_stats.json")
    optim = cfg.get("optim") or {}
    best = run_dir / "checkpoints" / "best.pt"
    if not summary:
        print(f"warning: {run_dir} has no eval/summary.json (unfinished, or trained with trainer.evaluate=false: "
              f"make eval RUN={run_dir})", file=sys.stderr)
    return {
        "method": peft["name"],
        "setting": "+".join([peft["name"], *(peft.get("train_extra") or [])]),
        "rank": peft.get("rank"),
        "groups": "+".join(peft["groups"]) if peft.get("groups") else None,
        "seed": cfg["seed"],
        "lr": _float(optim.get("lr")),
        # decoder-only has no tensors of its own: its adapter lr means nothing and is left empty
        "adapter_lr": None if peft["name"] == REFERENCE else _float(optim.get("lr") if optim.get("adapter_lr") is None
                                                                    else optim.get("adapter_lr")),
        "val_dice": stats.get("best_val_dice"),
        "selected": True,
        "dice": summary.get("Dice"),
        "zero_shot_dice": before.get("Dice"),
        "zero_shot_hd95": before.get("HD95"),
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
             "above_reference": above(_values(members, PAIRED)), "lr_cell": _lrs(members, "lr"),
             "adapter_lr_cell": _lrs(members, "adapter_lr")}
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


def zero_shot_rows(rows: Sequence[dict]) -> list[dict]:
    """One ``ZERO_SHOT`` row per seed: the pretrained model on the test split, as the runs of that seed evaluated it
    before training (``eval_pretrained/``; every run of a seed fine-tunes the same source model on the same split)."""
    found: dict[str, dict] = {}
    for row in rows:
        if row.get("zero_shot_dice") is not None and str(row["seed"]) not in found:
            found[str(row["seed"])] = {**dict.fromkeys(FIELDS), "method": ZERO_SHOT, "setting": ZERO_SHOT,
                                       "seed": row["seed"], "selected": True,
                                       "dice": row["zero_shot_dice"], "hd95": row["zero_shot_hd95"], "trainable": 0}
    return list(found.values())


def pair_with_zero_shot(rows: Sequence[dict], reference: Sequence[dict]) -> None:
    """Set each row's ``VS_ZERO_SHOT``: its Dice minus the zero-shot Dice of the same seed (None for zero-shot)."""
    dice = {str(r["seed"]): float(r["dice"]) for r in reference if r["method"] == ZERO_SHOT and r.get("dice") is not None}
    for row in rows:
        partner = dice.get(str(row["seed"]))
        paired = row["method"] != ZERO_SHOT and partner is not None and row.get("dice") not in (None, "")
        row[VS_ZERO_SHOT] = float(row["dice"]) - partner if paired else None


def _float(value) -> float | None:
    return None if value in (None, "") else float(value)


def tuning_seeds(rows: Sequence[dict], key: str) -> set[str]:
    """The seeds that ran more than one value of ``key``: those the choice is made on (the others ran only the
    chosen value, for the final numbers)."""
    values = {}
    for row in rows:
        if _float(row[key]) is not None:
            values.setdefault(str(row["seed"]), set()).add(_float(row[key]))
    return {seed for seed, seen in values.items() if len(seen) > 1}


def choose(rows: Sequence[dict], key: str, grid: Sequence[float] = ()) -> float | None:
    """The value of ``key`` (``adapter_lr`` or ``lr``) whose runs have the highest mean validation Dice over the seeds
    that ran more than one value (the tuning seeds); ties go to the first value of ``grid`` (ascending if not given).
    None when the rows have fewer than two values or no validation Dice (nothing to choose)."""
    values = sorted({_float(r[key]) for r in rows if _float(r[key]) is not None},
                    key=lambda v: (grid.index(v), v) if v in grid else (len(grid), v))
    if len(values) < 2:
        return None
    tune = tuning_seeds(rows, key)
    means = []
    for value in values:
        val = [_float(r["val_dice"]) for r in rows if _float(r[key]) == value and str(r["seed"]) in tune]
        val = [v for v in val if v is not None]
        means.append(statistics.fmean(val) if val else -math.inf)
    return None if max(means) == -math.inf else values[means.index(max(means))]


def select(rows: Sequence[dict], adapter_grid: Sequence[float] = (), lr_grid: Sequence[float] = ()) -> dict[str, float]:
    """Mark ``selected`` the runs at each method's chosen lr, chosen on validation Dice only (never on test): first the
    shared decoder lr, by decoder-only's runs when they ran several; then every method's adapter lr at that decoder
    lr. Returns the chosen adapter lr per tuned method (and ``"lr"``: the chosen decoder lr, when one was chosen)."""
    chosen: dict[str, float] = {}
    lr = choose([r for r in rows if r["method"] == REFERENCE], "lr", lr_grid)
    if lr is not None:
        chosen["lr"] = lr
    for row in rows:
        row["selected"] = lr is None or _float(row["lr"]) == lr
    for method in dict.fromkeys(r["method"] for r in rows):
        members = [r for r in rows if r["method"] == method and r["selected"]]
        best = None if method == REFERENCE else choose(members, "adapter_lr", adapter_grid)
        if best is not None:
            chosen[method] = best
            for row in members:
                row["selected"] = _float(row["adapter_lr"]) == best
    return chosen


def _lrs(rows: Sequence[dict], key: str) -> str:
    values = sorted({_float(r.get(key)) for r in rows if _float(r.get(key)) is not None})
    return ", ".join(f"{v:g}" for v in values) or "–"


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
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
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
    if method == ZERO_SHOT:
        return {"color": "grey", "marker": "x"}
    i = METHODS.index(method) if method in METHODS else len(METHODS)
    return {"color": f"C{i % 10}", "marker": "osD^v<>ph*"[i % 10]}


def _method_panel(ax, entries: Sequence[dict], metric: str, ylabel: str, title: str) -> None:
    # a legend, not labels at the points: methods of about the same size (decoder-only, CURLoRA, tCURLoRA, LoKr)
    # share an x, and their labels would print over each other
    for entry in entries:
        (params, _), (value, std) = entry["trainable"], entry[metric]
        if entry["method"] == ZERO_SHOT and not math.isnan(value):  # no parameters trained: a level, not a point
            ax.axhline(value, linestyle="--", color="grey", label="zero-shot (the source model)")
            continue
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


def plot_tuning(rows: Sequence[dict], chosen: dict[str, float], path: Path) -> Path:
    """Validation Dice (mean over the tuning seeds) vs the adapter lr, one line per tuned method, its chosen lr
    circled; beside it, when the decoder lr was tuned, decoder-only's validation Dice vs that lr. Test Dice plays no
    part in it."""
    plt = _pyplot()
    panels = [("adapter_lr", [m for m in chosen if m != "lr"], "adapter lr (the method's own tensors)")]
    if "lr" in chosen:
        panels.append(("lr", [REFERENCE], "decoder lr (decoder-only)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, methods, xlabel) in zip(axes[0], panels):
        for method in methods:
            mine = [r for r in rows if r["method"] == method and _float(r[key]) is not None and _float(r["val_dice"]) is not None]
            if key == "adapter_lr" and "lr" in chosen:
                mine = [r for r in mine if _float(r["lr"]) == chosen["lr"]]
            tune = tuning_seeds(mine, key)  # what the choice saw: not the final seeds at the chosen lr
            mine = [r for r in mine if str(r["seed"]) in tune]
            lrs = sorted({_float(r[key]) for r in mine})
            means = [statistics.fmean(_float(r["val_dice"]) for r in mine if _float(r[key]) == lr) for lr in lrs]
            ax.plot(lrs, means, label=method, **_style(method))
            best = chosen["lr" if key == "lr" else method]
            if best in lrs:
                ax.plot(best, means[lrs.index(best)], marker="o", markersize=12, fillstyle="none", color="black")
        ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="validation Dice (%), mean over tuning seeds",
               title="lr chosen on validation (circled)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


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
        rows += [r for r in comparison if r["method"] == "tcurlora" and r["selected"] and key(r) not in have]
    if stem == "attribution" and rows:  # the two ends of the gap, from the comparison: decoder-only and full
        rows += [r for r in comparison if r["method"] in (REFERENCE, "full", ZERO_SHOT) and r["selected"]]
    return rows


def attribution_sweeps(seeds: Sequence[int], experiment: str) -> dict[str, list[str]]:
    """One multirun per ATTRIBUTION setting, by sub-folder of ``attribution/``."""
    return {label: [f"+experiment={experiment}", f"peft={method}", f"peft.train_extra={hydra_list(extra)}",
                    f"seed={','.join(map(str, seeds))}"] for label, (method, extra) in ATTRIBUTION.items()}


def report(out: Path) -> list[Path]:
    """Collect every sweep folder of ``out`` into its CSV, Markdown table and plot; print the tables."""
    written = []
    collected: dict[str, list[dict]] = {}
    tuning = _read_json(out / "tuning.json")  # the grids of a tuned run (their order breaks ties)
    for folder, stem in SWEEPS.items():  # the comparison first: the ablation takes in its tCURLoRA rows
        rows = sweep_rows(out, folder, stem, collected.get("comparison", ()))
        if not rows:
            continue
        if stem == "comparison":
            rows = zero_shot_rows(rows) + rows
            chosen = select(rows, tuning.get("adapter_lrs", ()), tuning.get("lrs") or ())
            if chosen:
                written += [plot_tuning(rows, chosen, out / "tuning.png")]
                print("selected on validation Dice: " + ", ".join(f"{k} {v:g}" for k, v in chosen.items()), flush=True)
        collected[stem] = rows
        reference = collected["comparison"] if "comparison" in collected else ()
        pair_with_reference(rows, reference)  # the ablation pairs with the comparison's runs
        pair_with_zero_shot(rows, reference)
        entries = aggregate([r for r in rows if r["selected"]], KEYS[stem])
        if stem == "ablation":  # grouped by tensor setting, ranks ascending, whatever order the sub-sweeps ran in
            entries.sort(key=lambda e: (e["groups"] or "", int(e["rank"])))
        elif stem == "attribution":  # from decoder-only up to full
            order = [ZERO_SHOT, REFERENCE, *("+".join([m, *extra]) for m, extra in ATTRIBUTION.values()), "full"]
            entries.sort(key=lambda e: order.index(e["setting"]) if e["setting"] in order else len(order))
        else:  # zero-shot, then the paper's order, also for runs collected from several sweeps (e.g. over machines)
            entries.sort(key=lambda e: ([ZERO_SHOT, *METHODS].index(e["method"]) if e["method"] in [ZERO_SHOT, *METHODS]
                                        else len(METHODS) + 1))
        columns = COLUMNS[stem]
        if not any(row[PAIRED] is not None for row in rows):  # no decoder-only runs of the same seeds to pair with
            columns = [c for c in columns if c[1] not in (PAIRED, "above_reference")]
        if not any(row[VS_ZERO_SHOT] is not None for row in rows):  # no run evaluated the pretrained model
            columns = [c for c in columns if c[1] != VS_ZERO_SHOT]
        table = markdown(entries, KEYS[stem], columns)
        write_csv(rows, out / f"{stem}.csv")
        (out / f"{stem}.md").write_text(table)
        plot = {"comparison": plot_comparison, "ablation": plot_ablation}.get(stem)
        if plot:
            plot(entries, out / f"{stem}.png")
        outputs = ("csv", "md", "png") if plot else ("csv", "md")
        print(f"\n{stem} ({len(rows)} runs, {out / stem}.{'/.'.join(outputs)})\n{table}", flush=True)
        written += [out / f"{stem}.{ext}" for ext in outputs]
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
    parser.add_argument("--no-ablation", dest="ablation", action="store_false",
                        help="skip the tCURLoRA ablation and the attribution sweep")
    parser.add_argument("--no-attribution", dest="attribution", action="store_false",
                        help="skip the attribution sweep (decoder-only / tCURLoRA + one frozen part trained fully)")
    parser.add_argument("--no-comparison", dest="comparison", action="store_false",
                        help="skip the comparison of methods (only the ablation)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time on this machine (default 1: Hydra multiruns, any launcher)")
    parser.add_argument("--adapter-lrs", nargs="*", type=float, metavar="LR",
                        help="tune every method's own lr (optim.adapter_lr) over these values on validation Dice, then "
                             "run it at the chosen one (no values: 1e-4 ... 1e-1 in half decades)")
    parser.add_argument("--lrs", nargs="+", type=float, metavar="LR",
                        help="first choose the shared decoder lr (optim.lr) among these with decoder-only on validation")
    parser.add_argument("--tune-seeds", nargs="+", type=int, metavar="SEED",
                        help="seeds to tune on (default: all of --seeds); the final numbers use every seed")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/compare/<time>)")
    parser.add_argument("--collect-only", type=Path, metavar="OUT", help="only collect the runs already in OUT (no training)")
    return parser.parse_args(argv), extra


def has_validation(experiment: str, extra: Sequence[str]) -> bool:
    """Whether the runs of ``experiment`` (with ``extra``) validate, i.e. have a best validation Dice to tune on: a
    split file, a validation list file in the data root, or ``data.split.val`` above 0. True when the overrides do not
    compose (every run then stops on them with its own one-line error)."""
    cfg = run_config(experiment, extra)
    if cfg is None:
        return True
    data, split = cfg.data, cfg.data.split
    listed = split.get("files") and split.files.get("val") and data.root and (Path(data.root) / split.files.val).is_file()
    return bool(split.get("file") or listed or (split.get("val") or 0) > 0 or data.get("demo"))


def launch(sweeps: dict[str, list[str]], extra: Sequence[str], out: Path, jobs: int) -> list[str]:
    """Run ``sweeps`` (Hydra multiruns, or single runs ``jobs`` at a time); returns the sweeps with a failed run."""
    if jobs > 1:
        return run_parallel(sweeps, extra, out, jobs)
    return [name for name, overrides in sweeps.items() if run_sweep(overrides, extra, (out / name).resolve()) != 0]


def tuned_sweeps(args: argparse.Namespace, extra: Sequence[str], out: Path) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Tune on validation, then the final sweeps: (the sweeps left to run, overrides that every later run of the
    comparison's settings needs (the chosen decoder lr), the sweeps that failed on the way).

    1. with ``--lrs``: decoder-only at every decoder lr (``optim.lr``), tuning seeds; the best validation Dice picks
       the shared decoder lr;
    2. every other method at every adapter lr of the grid (``optim.adapter_lr``), tuning seeds, at that decoder lr
       (decoder-only once per seed); the best mean validation Dice picks each method's adapter lr;
    3. returned, not run: every method at its own lr on the remaining seeds.
    """
    grid, lrs, tune = args.adapter_lrs or ADAPTER_LRS, args.lrs or [], args.tune_seeds or args.seeds
    (out / "tuning.json").write_text(json.dumps({"adapter_lrs": grid, "lrs": lrs, "tune_seeds": tune}) + "\n")
    base = [f"+experiment={args.experiment}"]
    seeds = lambda values: f"seed={','.join(map(str, values))}"  # noqa: E731
    failed, decoder = [], []
    if lrs:
        failed += launch({"runs/tune_lr": [*base, seeds(tune), f"peft={REFERENCE}", f"optim.lr={','.join(map(str, lrs))}"]},
                         extra, out, args.jobs)
        chosen = select([collect_run(r) for r in run_folders(out / "runs" / "tune_lr")], lr_grid=lrs)
        if "lr" not in chosen:
            raise UserError(f"--lrs: decoder-only's runs in {out / 'runs' / 'tune_lr'} give no validation Dice to choose by")
        decoder = [f"optim.lr={chosen['lr']:g}"]
        print(f"decoder lr chosen on validation: {chosen['lr']:g}", flush=True)
    tuned = [m for m in args.methods if m != REFERENCE]
    sweeps = {"runs/tune": [*base, seeds(tune), f"peft={','.join(tuned)}",
                            f"optim.adapter_lr={','.join(map(str, grid))}", *decoder]} if tuned else {}
    if REFERENCE in args.methods and not lrs:
        sweeps["runs/tune_ref"] = [*base, seeds(tune), f"peft={REFERENCE}"]
    failed += launch(sweeps, extra, out, args.jobs)
    chosen = select([collect_run(r) for r in run_folders(out / "runs")], grid, lrs)
    missing = [m for m in tuned if m not in chosen]
    if missing:
        raise UserError(f"--adapter-lrs: no validation Dice to choose {', '.join(missing)}'s lr by (runs failed, or "
                        f"a grid of one value); see {out / 'runs' / 'tune'}")
    rest = [s for s in args.seeds if s not in tune]
    final = {}
    if rest:
        final = {f"runs/final/{m}": [*base, seeds(rest), f"peft={m}", f"optim.adapter_lr={chosen[m]:g}", *decoder]
                 for m in tuned}
        if REFERENCE in args.methods:
            final[f"runs/final/{REFERENCE}"] = [*base, seeds(rest), f"peft={REFERENCE}", *decoder]
    if "tcurlora" in chosen:  # the ablation runs at tCURLoRA's own lr
        decoder = [*decoder, f"optim.adapter_lr={chosen['tcurlora']:g}"]
    return final, decoder, failed


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: give 1 or more runs at a time", file=sys.stderr)
        return 2
    if not (args.comparison or args.ablation or args.collect_only):
        print("error: --no-comparison with --no-ablation leaves nothing to run; drop one of them", file=sys.stderr)
        return 2
    tuning = args.adapter_lrs is not None or args.lrs is not None
    if tuning and not args.collect_only:
        problem = None
        if not args.comparison:
            problem = "--adapter-lrs / --lrs tune the comparison's methods: drop --no-comparison"
        elif not set(args.tune_seeds or []) <= set(args.seeds):
            problem = f"--tune-seeds {args.tune_seeds} must be among --seeds {args.seeds}"
        elif not has_validation(args.experiment, extra):
            problem = (f"--adapter-lrs: --experiment {args.experiment} has no validation cases to tune on (never the "
                       f"test split): set data.split.val, e.g. -- data.split.val=5")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    out = args.collect_only or args.out or Path("outputs/compare") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    failed = []
    try:
        if args.collect_only is None:
            out.mkdir(parents=True, exist_ok=True)
            sweeps, shared_overrides = {}, []
            if tuning:
                sweeps, shared_overrides, failed = tuned_sweeps(args, extra, out)
            elif args.comparison:
                sweeps = {"runs": comparison_overrides(args.methods, args.seeds, args.experiment)}
            if args.ablation:
                shared = ([comparison_setting(args.experiment, extra)]
                          if args.comparison and "tcurlora" in args.methods else [])
                ablation = ablation_sweeps(args.ranks, args.groups, args.seeds, args.experiment, args.groups_rank,
                                           args.grid, done=[s for s in shared if s])
                sweeps.update({f"ablation/{name}": [*overrides, *shared_overrides] for name, overrides in ablation.items()})
                if args.attribution:
                    sweeps.update({f"attribution/{name}": [*overrides, *shared_overrides]
                                   for name, overrides in attribution_sweeps(args.seeds, args.experiment).items()})
            failed += launch(sweeps, extra, out, args.jobs)
    except KeyboardInterrupt:
        print(f"stopped by Ctrl-C; the runs that finished are in {out}: python scripts/compare.py "
              f"--collect-only {out}", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
