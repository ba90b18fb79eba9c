"""nnU-Net v2's own machinery on an exported dataset: plan + preprocess (3d_fullres), train on fold ``all``, predict.

Run by ``compare/nnunet.py`` as a child process whose environment holds ``nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` (nnU-Net reads them from the environment, before 2.6 at import time), so that nothing of the
user's own nnU-Net set-up is read or written::

    python -m tcurlora_seg.compare.nnunet_train --dataset-id 501 --budget budget.json --predict cases.json \
        --out predictions/ --stats nnunet_stats.json

Needs ``nnunetv2`` (``pip install -e '.[nnunet]'``); the rest of tcurlora_seg never imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

CONFIGURATION = "3d_fullres"
FOLD = "all"  # every exported training case trains, none is held out (nnU-Net validates on the same cases)
PLANS = "nnUNetPlans"


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming: the trainer's class name is its id)
    """nnU-Net's default trainer with fewer epochs and iterations (the CPU budget); everything else as nnU-Net's.

    The counts come from the class attribute ``budget`` (set from ``--budget`` before the trainer is built) and are
    set in ``initialize``, before the optimizer and its poly lr schedule are built from ``num_epochs``: ``__init__``
    stays nnUNetTrainer's, whose signature nnU-Net records (and which changed in 2.6: ``unpack_dataset`` went)."""

    budget: dict[str, int] = {"num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1}

    def initialize(self) -> None:
        for key, value in self.budget.items():
            setattr(self, key, int(value))
        super().initialize()


TRAINERS = {"nnUNetTrainer": nnUNetTrainer, "nnUNetTrainerBudget": nnUNetTrainerBudget}


def plan_and_preprocess(dataset_id: int, processes: int) -> None:
    """``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres --verify_dataset_integrity`` through its Python API."""
    extract_fingerprints([dataset_id], num_processes=processes, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    preprocess([dataset_id], PLANS, configurations=[CONFIGURATION], num_processes=[processes])


def build_trainer(dataset_id: int, budget: dict, device: torch.device) -> nnUNetTrainer:
    """The trainer of ``budget["trainer"]`` on the dataset's plans, fold ``all`` (what ``nnUNetv2_train`` builds)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    folder = Path(nnUNet_preprocessed) / convert_id_to_dataset_name(dataset_id)
    trainer_class = TRAINERS[budget["trainer"]]
    if trainer_class is nnUNetTrainerBudget:
        trainer_class.budget = {"num_epochs": budget["epochs"], "num_iterations_per_epoch": budget["iterations_per_epoch"],
                                "num_val_iterations_per_epoch": budget["val_iterations_per_epoch"]}
    plans = load_json(str(folder / f"{PLANS}.json"))
    # what nnUNetv2_train adds (nnU-Net 2.8 pops it in the trainer; older versions ignore the extra key)
    plans["continue_training"] = False
    return trainer_class(plans=plans, configuration=CONFIGURATION, fold=FOLD,
                         dataset_json=load_json(str(folder / "dataset.json")), device=device)


def timed_steps(trainer: nnUNetTrainer) -> list[float]:
    """Time every ``train_step`` of ``trainer`` (forward, backward, optimizer step on a batch already loaded: no
    data loading, no validation, as train_stats.json's step time); the instance's method is wrapped, the class is not."""
    steps: list[float] = []
    step = trainer.train_step

    def timed(batch: dict) -> dict:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        out = step(batch)  # returns the loss as a numpy value: the step has finished on the device
        steps.append(time.perf_counter() - start)
        return out

    trainer.train_step = timed
    return steps


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def predict(trainer: nnUNetTrainer, cases: dict[str, list[str]], out: Path, processes: int, mirroring: bool) -> None:
    """nnU-Net's inference (sliding window with gaussian weights, test-time mirroring if ``mirroring``, its
    resampling back to each image's grid) with the trained network, set up as nnUNetTrainer.perform_actual_validation
    does; writes ``out/<id>.nii.gz``."""
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    network = getattr(trainer.network, "_orig_mod", trainer.network)  # torch.compile's wrapper (nnU-Net on cuda)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=trainer.device.type == "cuda", device=trainer.device,
                                verbose=False, allow_tqdm=False)
    # the trained weights as the one "fold" to predict with (predict_from_files loads each fold's weights)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [network.state_dict()], trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(cases)
    predictor.predict_from_files([cases[i] for i in ids], [str(out / i) for i in ids], save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=processes,
                                 num_processes_segmentation_export=processes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-id", type=int, required=True)
    parser.add_argument("--budget", type=Path, required=True, help="JSON: trainer, epochs, iterations, device")
    parser.add_argument("--predict", type=Path, required=True, help="JSON: case id -> its channel files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the predicted masks")
    parser.add_argument("--stats", type=Path, required=True, help="JSON written with the times and the trainer used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="nnU-Net's preprocessing / export processes")
    parser.add_argument("--augment-processes", type=int,
                        help="nnUNet_n_proc_DA while training (0: augmentation in this process); default: nnU-Net's")
    args = parser.parse_args(argv)
    budget = json.loads(args.budget.read_text())
    device = torch.device(budget["device"])
    random.seed(args.seed)  # nnU-Net seeds nothing itself; its data loader draws from numpy's global generator
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    plan_and_preprocess(args.dataset_id, args.processes)
    plan_s = time.perf_counter() - start

    if args.augment_processes is not None:  # not before: the planner sets torch's threads to this number
        os.environ["nnUNet_n_proc_DA"] = str(args.augment_processes)
    trainer = build_trainer(args.dataset_id, budget, device)
    steps = timed_steps(trainer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.run_training()
    train_s = time.perf_counter() - start
    memory = peak_memory_mb(device)

    start = time.perf_counter()
    predict(trainer, json.loads(args.predict.read_text()), args.out, args.processes, bool(budget["mirroring"]))
    predict_s = time.perf_counter() - start

    config = trainer.configuration_manager
    timed = steps[1:] or steps  # the first step is warm-up, as in train_stats.json
    stats = {
        "trainer": trainer.__class__.__name__,
        "epochs": trainer.num_epochs,
        "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "val_iterations_per_epoch": trainer.num_val_iterations_per_epoch,
        "device": str(trainer.device),
        "mirroring": bool(budget["mirroring"]),
        "configuration": CONFIGURATION,
        "fold": FOLD,
        "plans": PLANS,
        "patch_size": list(config.patch_size),
        "batch_size": config.batch_size,
        "spacing": list(config.spacing),
        "trainable": sum(p.numel() for p in trainer.network.parameters() if p.requires_grad),
        "plan_and_preprocess_s": plan_s,
        "train_s": train_s,
        "predict_s": predict_s,
        "step_time_s": float(np.mean(timed)) if timed else None,
        "timed_steps": len(timed),
        "peak_memory_mb": memory,
        "torch_threads": torch.get_num_threads(),
        "augment_processes": os.environ.get("nnUNet_n_proc_DA"),
        "seed": args.seed,
        "nnunetv2": version("nnunetv2"),
        "torch": torch.__version__,
        "output_folder": str(trainer.output_folder),
    }
    args.stats.write_text(json.dumps(stats, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
