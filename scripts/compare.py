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
``--method-lrs full=1e-3 tcurlora=1e-2`` runs those methods at fixed adapter lrs instead (the ones an earlier
tuned comparison chose, say: ``comparison.csv``'s selected rows), without tuning; the others at their defaults.
Every table has a ``zero_shot`` row (the pretrained model on the same test cases, from the runs' eval_pretrained/)
and each method's Δ Dice vs zero-shot, paired by seed. The attribution sweep (``OUT/attribution``, skipped with
``--no-attribution`` or ``--no-ablation``) trains one frozen part fully on top of decoder-only (the skip encoders
encoder1..4, the patch embedding, the ViT blocks) and the skip encoders on top of tCURLoRA (``peft.train_extra``, at
the decoder's lr), beside the comparison's decoder-only and full: which part the gap to full fine-tuning comes from.

Shots (``--shots K ...``, issue 29): every method trained on the first K training cases of one fixed list
(``data.split.shots``; the demo's pool grows to max K, ``data.demo.train``), the same validation and test cases for
every K, into ``OUT/runs/shots_KK``; ``comparison.csv`` gets a ``shots`` column, ``shots.md`` / ``shots.png`` test
Dice vs K with each method's Δ vs ``scratch`` (the backbone trained from its random init) and the K from which it
beats scratch. With ``--adapter-lrs`` the lrs are tuned once, at ``--tune-shots`` (default the largest K): the step
count does not depend on K (docs/comparison.md says why and what it costs).

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
                                     (the same data stream: common random numbers), and at how many seeds it is above;
                                     every Δ with a 95 % paired-bootstrap CI over test cases x seeds (bold: excludes 0)
                                     and a Wilcoxon p over the cases; HD95 with all components and with components
                                     < 1 cm³ removed (docs/comparison.md, "How to read the tables")
    comparison.png / ablation.png    Dice vs trainable parameters (log x) / Dice vs rank, error bars = std over seeds;
                                     beside it the paired Δ Dice vs decoder-only the same way
    attribution.csv / .md            the attribution sweep's runs and table
    tuning.json / tuning.png         the lr grids and tuning seeds; validation Dice vs lr (with --adapter-lrs)
    tuning.md                        test Dice at every lr of the grid, validation's choice and test's marked
The demo pretrains its source model in the first run when it is not cached; on a cluster, where runs start
together, run ``python -m tcurlora_seg.train +experiment=demo_source`` once first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a clone

from tcurlora_seg.compare.constants import GROUPS, METHODS, RANKS, REFERENCE  # noqa: E402
from tcurlora_seg.compare.sweeps import (  # noqa: E402
    ablation_sweeps, attribution_sweeps, comparison_overrides, comparison_setting, has_validation, launch, shots_overrides,
    shots_sweeps, tuned_sweeps,
)
from tcurlora_seg.compare.tables import report  # noqa: E402
from tcurlora_seg.errors import UserError  # noqa: E402


def method_lr(text: str) -> tuple[str, float]:
    """``METHOD=LR`` of --method-lrs."""
    method, _, lr = text.partition("=")
    try:
        return method, float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give METHOD=LR, e.g. tcurlora=1e-2") from None


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
    parser.add_argument("--method-lrs", nargs="+", type=method_lr, metavar="METHOD=LR",
                        help="run these methods at fixed adapter lrs (optim.adapter_lr), e.g. the ones an earlier "
                             "--adapter-lrs run chose on validation: full=1e-3 tcurlora=1e-2; the others at their "
                             "defaults; not with --adapter-lrs / --lrs")
    parser.add_argument("--shots", nargs="+", type=int, metavar="K",
                        help="shots sweep (issue 29): every method trained on the first K training cases of one fixed "
                             "seeded list, for each K (the same validation and test cases); OUT/runs/shots_KK, a "
                             "shots column in comparison.csv, shots.md / shots.png; replaces the ablation")
    parser.add_argument("--tune-shots", type=int, metavar="K",
                        help="with --shots and --adapter-lrs: the K the lrs are tuned at, once for every K "
                             "(default: the largest K)")
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/compare/<time>)")
    parser.add_argument("--collect-only", type=Path, metavar="OUT", help="only collect the runs already in OUT (no training)")
    return parser.parse_args(argv), extra




def fixed_lrs(methods: Sequence[str], fixed: dict[str, float]) -> dict[str, list[str]] | None:
    """method -> its lr override (none: the method's default), or None without --method-lrs (one shared sweep)."""
    return {m: [f"optim.adapter_lr={fixed[m]:g}"] if m in fixed else [] for m in methods} if fixed else None


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: give 1 or more runs at a time", file=sys.stderr)
        return 2
    if not (args.comparison or args.ablation or args.collect_only):
        print("error: --no-comparison with --no-ablation leaves nothing to run; drop one of them", file=sys.stderr)
        return 2
    if args.shots and (min(args.shots) < 1 or (args.tune_shots is not None and args.tune_shots not in args.shots)):
        print(f"error: --shots {args.shots} / --tune-shots {args.tune_shots}: give case counts >= 1, the tuning one "
              "among them", file=sys.stderr)
        return 2
    if args.shots and args.ablation and not args.collect_only:
        print("note: --shots runs no ablation (it ablates the default comparison)", file=sys.stderr)
        args.ablation = False
    tuning = args.adapter_lrs is not None or args.lrs is not None
    fixed = dict(args.method_lrs or [])
    if fixed and not args.collect_only:
        problem = None
        if tuning:
            problem = "--method-lrs fixes the lrs that --adapter-lrs / --lrs would tune: give one or the other"
        elif not set(fixed) <= set(args.methods):
            problem = f"--method-lrs {' '.join(sorted(set(fixed) - set(args.methods)))}: not among --methods {' '.join(args.methods)}"
        elif REFERENCE in fixed:
            problem = (f"--method-lrs {REFERENCE}: it trains no adapter (only the decoder, at optim.lr); set that after "
                       f"--, e.g. -- optim.lr=1e-3")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
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
            by_k = shots_overrides(args.shots, args.experiment, extra) if args.shots else {}
            if tuning and args.shots:
                # once, at one k (see shots_lrs): tuning and final runs there, then every other k at those lrs
                tune_k = args.tune_shots or max(args.shots)
                at_k = by_k.pop(tune_k)
                sweeps, shared_overrides, failed, chosen = tuned_sweeps(args, [*extra, *at_k], out)
                sweeps = {name: [*overrides, *at_k] for name, overrides in sweeps.items()}  # its final seeds
                decoder = [o for o in shared_overrides if not o.startswith("optim.adapter_lr=")]  # (the ablation's)
                lrs = {m: [*([f"optim.adapter_lr={chosen[m]:g}"] if m in chosen else []), *decoder] for m in args.methods}
                sweeps.update(shots_sweeps(args.methods, args.seeds, args.experiment, by_k, lrs))
            elif tuning:
                sweeps, shared_overrides, failed, _ = tuned_sweeps(args, extra, out)
            elif args.shots:
                sweeps = shots_sweeps(args.methods, args.seeds, args.experiment, by_k, fixed_lrs(args.methods, fixed))
            elif fixed:  # one sweep per method, each at its own lr
                sweeps = {f"runs/{m}": [f"+experiment={args.experiment}", f"seed={','.join(map(str, args.seeds))}",
                                        f"peft={m}", *lrs] for m, lrs in fixed_lrs(args.methods, fixed).items()}
                if "tcurlora" in fixed:  # the ablation runs at tCURLoRA's own lr, as after tuning
                    shared_overrides = [f"optim.adapter_lr={fixed['tcurlora']:g}"]
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
                                   for name, overrides in attribution_sweeps(args.seeds, args.experiment, extra).items()})
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
