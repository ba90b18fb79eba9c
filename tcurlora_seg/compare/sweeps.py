"""The runs of a comparison: Hydra overrides per sweep, single runs N at a time (kept when finished earlier, continued
when stopped), the lr tuning on validation."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tcurlora_seg.compare.collect import collect_run, run_folders, select
from tcurlora_seg.compare.constants import ADAPTER_LRS, GROUPS, REFERENCE, SCRATCH, attribution
from tcurlora_seg.errors import UserError

REPO = Path(__file__).resolve().parents[2]  # the repository: configs/ and the package for the runs


def hydra_list(values: Sequence[str]) -> str:
    return "[" + ",".join(values) + "]"


def comparison_overrides(methods: Sequence[str], seeds: Sequence[int], experiment: str) -> list[str]:
    # Hydra varies the first sweep override slowest: seed first runs every method once before any second seed, so
    # a sweep stopped part-way still compares every method
    return [f"+experiment={experiment}", f"seed={','.join(map(str, seeds))}", f"peft={','.join(methods)}"]


def shots_overrides(shots: Sequence[int], experiment: str, extra: Sequence[str] = ()) -> dict[int, list[str]]:
    """k -> the overrides that train on the first k cases of one fixed training list (``data.split.shots``); the
    embedded demo first grows its pool to max(k) cases (``data.demo.train``), the same pool for every k, so that the
    first k are the same cases in every run, and val / test do not change."""
    cfg = run_config(experiment, extra)
    pool = [f"data.demo.train={max(shots)}"] if cfg is not None and cfg.data.get("demo") else []
    return {k: [f"data.split.shots={k}", *pool] for k in shots}


def shots_sweeps(methods: Sequence[str], seeds: Sequence[int], experiment: str, by_k: dict[int, list[str]],
                 lrs: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """One comparison per k, labelled by k (``runs/shots_KK``). ``lrs``: method -> its lr overrides (tuned), one
    sweep per method and k then (``runs/shots_KK/<method>``)."""
    if lrs is None:
        return {f"runs/shots_{k:02d}": [*comparison_overrides(methods, seeds, experiment), *over] for k, over in by_k.items()}
    return {f"runs/shots_{k:02d}/{m}": [f"+experiment={experiment}", f"seed={','.join(map(str, seeds))}", f"peft={m}",
                                        *lrs.get(m, []), *over] for k, over in by_k.items() for m in methods}


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


def run_settings(overrides: Sequence[str]) -> set[str]:
    """The overrides that say what a run trains and measures: a finished run with other values of the rest is the
    same run. The rest: what a resumed run may change (``engine.resume.RESUME_FREE``: device, progress, ...) and
    the test evaluation that compare.py adds itself."""
    from tcurlora_seg.engine.resume import RESUME_FREE  # (the engine imports MONAI: not at compare.py's start)

    free = RESUME_FREE | {"trainer.evaluate"}
    return {o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in free and not o.startswith("hydra")}


def finished_earlier(run_dir: Path, overrides: Sequence[str]) -> bool:
    """Whether ``run_dir`` holds a finished, evaluated run of these settings (from an earlier call with this --out).

    A folder of other settings is not: its run starts again there and stops on the resume check's one-line error."""
    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not ((run_dir / "eval" / "summary.json").is_file() and recorded.is_file()):
        return False
    from omegaconf import OmegaConf

    return run_settings(OmegaConf.load(recorded)) == run_settings(overrides)


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
    # a run from scratch has no pretrained model to evaluate (nor pretrains the demo's source model): not it
    transfer = lambda job: _value(job[2], "peft") != SCRATCH  # noqa: E731
    for name, num, run in filter(transfer, queue):
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
    first = next(filter(transfer, queue), queue[0])
    run_one(first, alone)  # alone: it may pretrain the demo's source model, which every later run loads
    with ThreadPoolExecutor(jobs) as pool:
        # on Ctrl-C, map cancels the queued runs; the running ones got the Ctrl-C too and save their checkpoints
        list(pool.map(run_one, [job for job in queue if job is not first]))
    return [name for name in sweeps if name in failed]


def attribution_sweeps(seeds: Sequence[int], experiment: str, extra: Sequence[str] = ()) -> dict[str, list[str]]:
    """One multirun per attribution setting of the experiment's backbone (``constants.attribution``), by sub-folder
    of ``attribution/``."""
    cfg = run_config(experiment, extra)
    backbone = (cfg.model.get("backbone") if cfg is not None else None) or "unetr"
    return {label: [f"+experiment={experiment}", f"peft={method}", f"peft.train_extra={hydra_list(modules)}",
                    f"seed={','.join(map(str, seeds))}"] for label, (method, modules) in attribution(backbone).items()}


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


def tuned_sweeps(args: argparse.Namespace, extra: Sequence[str], out: Path
                 ) -> tuple[dict[str, list[str]], list[str], list[str], dict[str, float]]:
    """Tune on validation, then the final sweeps: (the sweeps left to run, overrides that every later run of the
    comparison's settings needs (the chosen decoder lr), the sweeps that failed on the way, the chosen adapter lr per
    tuned method).

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
    methods = {m: chosen[m] for m in tuned}
    if "tcurlora" in chosen:  # the ablation runs at tCURLoRA's own lr
        decoder = [*decoder, f"optim.adapter_lr={chosen['tcurlora']:g}"]
    return final, decoder, failed, methods
