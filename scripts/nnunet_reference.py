"""nnU-Net v2 as a reference beside the comparison: trained by its own machinery on the experiment's training cases,
scored by our metrics on its test cases, one ``nnunet`` row per seed in comparison.csv.

    python scripts/nnunet_reference.py                                     # the demo, seed 0, CPU budget
    python scripts/nnunet_reference.py --seeds 0 1 2 --out outputs/compare/2025-01-01_12-00-00   # beside a comparison
    python scripts/nnunet_reference.py --run-dir outputs/demo/tcurlora/2025-01-01_12-00-00       # that run's split
    python scripts/nnunet_reference.py --budget gpu --experiment eadc -- data.root=PATH          # nnU-Net's defaults
    python scripts/nnunet_reference.py --epochs 20 --iterations 25         # another CPU budget
    python scripts/nnunet_reference.py --seeds 0 1 2 --out outputs/shots/demo -- data.split.shots=5 data.demo.train=20
                                                                           # k = 5 of compare.py --shots ... 20

Needs nnU-Net v2 in the interpreter that runs this (an optional extra, kept out of ``make``):
``pip install torch==2.13.0 -e '.[nnunet]'`` (name the torch you have, or pip may swap it for another build).

The cases: ``--experiment E`` (with Hydra overrides after ``--``, as compare.py's) composes the config that
``python -m tcurlora_seg.train +experiment=E seed=S`` runs with; ``--run-dir RUN`` (one or more) takes a run's
config.yaml and exactly its split.json (and its seed). Each seed becomes a run folder ``OUT/runs/nnunet/seed_<S>/``
(in a shots sweep, ``-- data.split.shots=K`` or ``--shots K``: ``OUT/runs/shots_KK/nnunet/seed_<S>/``)
(see ``tcurlora_seg/compare/nnunet.py`` for its files), which ``compare.py --collect-only OUT`` reads like the
runs of the methods; at the end the tables of OUT are written again (comparison.csv / .md / .png). A seed that
finished earlier with the same settings is kept (``--force`` trains it again).

Budgets: ``cpu`` (default): nnUNetTrainerBudget, nnU-Net's trainer with 2 epochs x 6 iterations and one
validation iteration per epoch, on the CPU, inference without test-time mirroring (about 10 minutes on the demo with
one thread: a smoke run of the pipeline, far too short to learn the task, see docs/nnunet.md); ``gpu``: nnU-Net's own
nnUNetTrainer, 1000 epochs x 250 iterations, on cuda, with mirroring. Always plans 3d_fullres and trains fold ``all`` (every training case, nothing held out). The trainer, its
counts and the training time go into each run folder's train_stats.json and config.yaml.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a clone

from tcurlora_seg.compare.nnunet import (  # noqa: E402
    BUDGETS, budget_for, experiment_config, reference_folder, reference_run, run_folder_config,
)
from tcurlora_seg.errors import UserError  # noqa: E402


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Hydra overrides for --experiment go after --, e.g. -- data.root=PATH")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--experiment", default="demo", help="configs/experiment/ name (default: demo)")
    source.add_argument("--run-dir", nargs="+", type=Path, metavar="RUN",
                        help="training run folders: nnU-Net trains on exactly their split.json (and seed)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="with --experiment: seeds (default: 0)")
    parser.add_argument("--budget", default="cpu", choices=list(BUDGETS), help="cpu (default) or gpu (nnU-Net's defaults)")
    parser.add_argument("--epochs", type=int, help="epochs instead of the budget's (trainer: nnUNetTrainerBudget)")
    parser.add_argument("--iterations", type=int, help="training iterations per epoch instead of the budget's")
    parser.add_argument("--val-iterations", type=int, help="validation iterations per epoch instead of the budget's")
    parser.add_argument("--mirroring", action=argparse.BooleanOptionalAction,
                        help="test-time mirroring in nnU-Net's inference (default: off on cpu, on on gpu)")
    parser.add_argument("--shots", type=int, help="the shots value of the rows (default: the number of training cases)")
    parser.add_argument("--processes", type=int, default=1, help="nnU-Net's preprocessing / export processes (default 1)")
    parser.add_argument("--out", type=Path, help="comparison folder to add the rows to (default: outputs/nnunet/<time>)")
    parser.add_argument("--force", action="store_true", help="train seeds again that finished earlier")
    return parser.parse_args(argv), extra


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    out = args.out or Path("outputs/nnunet") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        if args.run_dir and extra:
            raise UserError("overrides after -- apply to --experiment; a --run-dir keeps its own config")
        budget = budget_for(args.budget, args.epochs, args.iterations, args.val_iterations, args.mirroring)
        if args.run_dir:
            jobs = [(run_folder_config(run), f"run {run}") for run in args.run_dir]
        else:
            jobs = [(experiment_config(args.experiment, seed, extra), f"experiment {args.experiment} {' '.join(extra)}".strip())
                    for seed in args.seeds]
        for cfg, source in jobs:
            reference_run(cfg, reference_folder(out, cfg, args.shots), budget, source=source, shots=args.shots,
                          processes=args.processes, force=args.force)
        from tcurlora_seg.compare.tables import report

        report(out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stopped by Ctrl-C; the seeds that finished are in {out}/runs", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
