"""nnU-Net v2 as a reference row of the comparison: what a medical-imaging user would train instead of fine-tuning.

nnU-Net trains by its own machinery (its plans, preprocessing, augmentation, network, loss, inference) on exactly the
training cases of an experiment's split and predicts its test cases; the predictions are scored by our metric code
(``engine.metrics``: the same Dice, HD95, spacing and empty-mask policy, and ``trainer.eval_min_component_mm3``). The
result is a run folder that ``compare.collect.collect_run`` reads as a run of method ``nnunet``::

    config.yaml          seed, peft.name = nnunet, the experiment's data config (split.file -> split.json), the budget
    split.json           the experiment's cases (train: what nnU-Net trained on; test: what was scored)
    train_stats.json     trainer, epochs, iterations, device, training time, step time, peak memory, parameters
    eval/metrics.csv     one row per test case, as a run's eval/metrics.csv; eval/summary.json beside it
    eval/predictions/    the masks that were scored
    nnunet/raw|preprocessed|results   this run's nnUNet_raw / nnUNet_preprocessed / nnUNet_results (nothing else is
                         read or written: the variables are set for nnU-Net's process only)
    nnunet/log.txt       nnU-Net's own output

Export (``export_dataset``), scoring and the run folder need no nnU-Net; planning, training and prediction run in a
child process (``compare/nnunet_train.py``) of the interpreter that has ``nnunetv2`` (``pip install -e '.[nnunet]'``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.data.splits import take_shots, write_split
from tcurlora_seg.engine.evaluate import load_reference
from tcurlora_seg.engine.inference import write_mask
from tcurlora_seg.engine.metrics import case_metrics, markdown_table, summarize, write_metrics_csv
from tcurlora_seg.engine.postprocess import remove_small_components
from tcurlora_seg.errors import UserError

__all__ = ["METHOD", "DATASET_ID", "Budget", "BUDGETS", "budget_for", "experiment_config", "run_folder_config",
           "export_dataset", "evaluate_predictions", "reference_run"]

METHOD = "nnunet"
DATASET_ID = 501  # nnU-Net keeps 001-499 for public datasets; each run folder has its own nnUNet_raw
FILE_ENDING = ".nii.gz"
REPO = Path(__file__).resolve().parents[2]
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass(frozen=True)
class Budget:
    """What nnU-Net trains for: its trainer class, epochs x iterations (batches of the plan's size), the device, and
    whether its inference averages over mirrored inputs (8 forward passes per window in 3-D instead of 1)."""

    name: str
    trainer: str
    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    device: str
    mirroring: bool


# cpu: nnU-Net's trainer with fewer epochs and iterations (nnunet_train.nnUNetTrainerBudget), inference without
# mirroring: on the demo's default target (5 training cases; nnU-Net plans 3d_fullres, patch 80x96x80, batch 2,
# 34 s per step on one thread) 10 minutes in all, of which 7.3 training: it tests the pipeline, it does not learn
# the task (docs/nnunet.md). A reference row needs the gpu budget.
# gpu: nnU-Net as it ships: nnUNetTrainer (1000 epochs x 250 iterations, 50 validation iterations), mirroring.
BUDGETS = {"cpu": Budget("cpu", "nnUNetTrainerBudget", 2, 6, 1, "cpu", False),
           "gpu": Budget("gpu", "nnUNetTrainer", 1000, 250, 50, "cuda", True)}


def budget_for(name: str, epochs: int | None = None, iterations: int | None = None,
               val_iterations: int | None = None, mirroring: bool | None = None) -> Budget:
    """``BUDGETS[name]``, with other counts when given (then nnUNetTrainerBudget, on the budget's device) and
    mirroring on or off when given."""
    if name not in BUDGETS:
        raise UserError(f"--budget {name}: choose one of {', '.join(BUDGETS)}")
    base = BUDGETS[name]
    if mirroring is not None and mirroring != base.mirroring:
        base = Budget(**{**asdict(base), "mirroring": mirroring, "name": f"{name}-custom"})
    counts = {"epochs": epochs, "iterations_per_epoch": iterations, "val_iterations_per_epoch": val_iterations}
    for key, value in counts.items():
        if value is not None and value < 1:
            raise UserError(f"--{key.split('_per')[0].replace('_', '-')} {value}: give 1 or more")
    given = {k: v for k, v in counts.items() if v is not None}
    if not given:
        return base
    return Budget(**{**asdict(base), **given, "trainer": "nnUNetTrainerBudget", "name": f"{name}-custom"})


def experiment_config(experiment: str, seed: int, overrides: Sequence[str] = ()) -> DictConfig:
    """The config that ``python -m tcurlora_seg.train +experiment=E seed=S OVERRIDES`` runs with (its data split,
    its evaluation protocol)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    given = [f"+experiment={experiment}", f"seed={seed}", *(o for o in overrides if not o.lstrip("+~").startswith("hydra"))]
    try:
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            return compose("train", overrides=given)
    except (HydraException, ValueError, TypeError) as err:
        raise UserError(f"--experiment {experiment} with {' '.join(overrides) or 'no overrides'}: {err}") from err


def reference_cases(cfg_data: Mapping) -> dict[str, list[dict]]:
    """The cases a run of ``cfg_data`` trains and is tested on, exactly as the trainer takes them: its split with
    ``data.split.shots`` applied (the first k training cases of a shots sweep)."""
    return take_shots(load_cases(cfg_data), cfg_data.get("split") or {})


def reference_folder(out: str | os.PathLike, cfg: DictConfig, shots: int | None = None) -> Path:
    """Where a seed's ``nnunet`` run goes in the comparison folder OUT: ``runs/nnunet/seed_<S>``, or in a shots
    sweep (``shots``, or the config's ``data.split.shots``) ``runs/shots_KK/nnunet/seed_<S>`` beside the methods'
    runs of that k, so the seeds of different ks do not overwrite each other."""
    k = shots if shots is not None else (cfg.get("data", {}).get("split", {}) or {}).get("shots")
    return Path(out, "runs", *([f"shots_{int(k):02d}"] if k is not None else []), METHOD, f"seed_{cfg.seed}")


def run_folder_config(run_dir: str | os.PathLike) -> DictConfig:
    """A training run's config with its own split.json as the split: the reference trains on exactly its cases."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "split.json"):
        if not (run_dir / name).is_file():
            raise UserError(f"--run-dir {run_dir}: no {name}; give a run folder written by tcurlora_seg.train")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.data.split.file = str(run_dir / "split.json")
    return cfg


def dataset_name(cfg_data: Mapping[str, Any], dataset_id: int = DATASET_ID) -> str:
    """``DatasetXXX_<data root's folder name>``, the name nnU-Net finds the dataset by."""
    stem = re.sub(r"[^A-Za-z0-9]+", "", Path(str(cfg_data.get("root") or "data")).name) or "data"
    return f"Dataset{dataset_id:03d}_{stem}"


def _channels(case: Mapping[str, Any]) -> list[tuple[str, int | None]]:
    """(file, index in its 4th axis or None) per image channel: a list of 3-D files, or one 3-D / 4-D file."""
    images = case["image"]
    if not isinstance(images, str):
        return [(str(path), None) for path in images]
    shape = nib.load(images).shape
    return [(images, None)] if len(shape) == 3 or shape[3] == 1 else [(images, c) for c in range(shape[3])]


def _write_channel(source: str, index: int | None, target: Path) -> None:
    if index is None and source.endswith(FILE_ENDING):
        shutil.copyfile(source, target)  # bit for bit: nnU-Net reads the file the runs read
        return
    image = nib.load(source)
    data = np.asanyarray(image.dataobj)
    data = data[..., index] if index is not None else data.reshape(data.shape[:3])
    out = nib.Nifti1Image(data, image.affine)
    out.header.set_xyzt_units(*image.header.get_xyzt_units())
    nib.save(out, target)


def export_dataset(cases: Mapping[str, Sequence[Mapping[str, Any]]], cfg_data: Mapping[str, Any], raw: Path,
                   dataset_id: int = DATASET_ID, channel_name: str = "MRI") -> Path:
    """Write the training cases (imagesTr/, labelsTr/) and the test cases (imagesTs/) in nnU-Net v2's raw format.

    Images: ``{id}_{channel:04d}.nii.gz``, copied as stored (a 4-D file is split into its channels). Labels:
    ``{id}.nii.gz``, the label file with ``data.label_map`` applied (``engine.evaluate.load_reference``, what the
    runs are scored against), so that nnU-Net's classes 0..num_classes-1 are ours; written on the first image
    channel's affine, which the data check holds equal to the label's within ``data.affine_tol``.
    ``dataset.json``: channel_names (nnU-Net's normalisation: "MRI" = z-score per image, "CT" = global), labels,
    numTraining, file_ending. The validation cases are not exported (nnU-Net trains on fold ``all``). Returns the
    dataset folder.
    """
    train, test = list(cases.get("train", [])), list(cases.get("test", []))
    if not train or not test:
        raise UserError(f"data.split of data.root={cfg_data.get('root')} gives {len(train)} training and {len(test)} "
                        "test cases; nnU-Net needs both (set data.split or the list files)")
    ids = [str(c["id"]) for c in train + test]
    if len(set(ids)) != len(ids):
        raise UserError(f"data.split lists a case twice or in train and test: {sorted({i for i in ids if ids.count(i) > 1})}")
    num_classes, in_channels = int(cfg_data["num_classes"]), int(cfg_data.get("in_channels", 1))
    folder = raw / dataset_name(cfg_data, dataset_id)
    if folder.exists():
        shutil.rmtree(folder)  # an earlier export of another split must not leave cases behind
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    for split, sub in (("train", "imagesTr"), ("test", "imagesTs")):
        for case in cases[split]:
            channels = _channels(case)
            if len(channels) != in_channels:
                raise UserError(f"case {case['id']}: {len(channels)} image channels but data.in_channels={in_channels}; "
                                "set data.in_channels or data.modality")
            for c, (source, index) in enumerate(channels):
                _write_channel(source, index, folder / sub / f"{case['id']}_{c:04d}{FILE_ENDING}")
            if split == "train":
                label, _ = load_reference(case["label"], cfg_data)
                found = sorted(set(np.unique(label).tolist()) - set(range(num_classes)))
                if found:
                    raise UserError(f"{case['label']}: label values {found} outside 0..{num_classes - 1} after "
                                    "data.label_map; map them in data.label_map or raise data.num_classes")
                write_mask(folder / "labelsTr" / f"{case['id']}{FILE_ENDING}", label, channels[0][0])
    meta = {
        "name": folder.name,
        "description": f"tcurlora_seg export of data.root={cfg_data.get('root')}: the experiment's training cases "
                       "(imagesTr, labelsTr, data.label_map applied) and test cases (imagesTs)",
        "channel_names": {str(c): channel_name for c in range(in_channels)},
        "labels": {"background": 0, **{f"class_{c}": c for c in range(1, num_classes)}},
        "numTraining": len(train),
        "file_ending": FILE_ENDING,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def evaluate_predictions(predictions: Path, cases: Sequence[Mapping[str, Any]], cfg_data: Mapping[str, Any],
                         out: Path, min_component_mm3: float = 0.0) -> dict[str, Any]:
    """Score ``predictions/<id>.nii.gz`` against the test cases' labels as ``engine.evaluate.evaluate_run`` scores a
    run (label file's grid and spacing, data.label_map, components under ``min_component_mm3`` removed); writes
    ``out/metrics.csv``, ``out/summary.json`` and ``out/predictions/``; returns the summary."""
    num_classes = int(cfg_data["num_classes"])
    per_case = []
    for case in cases:
        path = predictions / f"{case['id']}{FILE_ENDING}"
        if not path.is_file():
            raise UserError(f"{path}: nnU-Net wrote no prediction for test case {case['id']}; see nnunet/log.txt")
        mask = np.rint(np.asanyarray(nib.load(path).dataobj)).astype(np.int16)
        reference, spacing = load_reference(case["label"], cfg_data)
        if min_component_mm3 > 0:
            mask = remove_small_components(mask, spacing, min_component_mm3)
        per_case.append(case_metrics(mask, reference, spacing, num_classes, case_id=case["id"]))
        write_mask(out / "predictions" / f"{case['id']}{FILE_ENDING}", mask, case["label"])
    summary = summarize(per_case)
    summary["evaluation"] = {"method": METHOD, "split": "test", "n_cases": len(per_case),
                             "min_component_mm3": min_component_mm3, "predictions": str(predictions),
                             "grid": "label file grid as stored (nnU-Net resamples its predictions to the image grid)"}
    write_metrics_csv(out / "metrics.csv", per_case)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _finished(run_dir: Path, settings: dict[str, Any]) -> bool:
    if not (run_dir / "eval" / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")).get("nnunet") == settings


def _run_nnunet(run_dir: Path, budget: Budget, seed: int, predict: dict[str, list[str]], python: str,
                processes: int) -> dict[str, Any]:
    """nnunet_train in a child process with this run's nnU-Net folders; returns its stats."""
    work = run_dir / "nnunet"
    (work / "budget.json").write_text(json.dumps(asdict(budget), indent=2) + "\n")
    (work / "predict.json").write_text(json.dumps(predict, indent=2) + "\n")
    env = {**os.environ, **{var: str((work / var.split("_")[1]).resolve()) for var in NNUNET_VARS},
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [python, "-m", "tcurlora_seg.compare.nnunet_train", "--dataset-id", str(DATASET_ID),
               "--budget", str(work / "budget.json"), "--predict", str(work / "predict.json"),
               "--out", str(work / "predictions"), "--stats", str(work / "stats.json"), "--seed", str(seed),
               "--processes", str(processes)]
    if budget.device == "cpu" and "nnUNet_n_proc_DA" not in os.environ:
        command += ["--augment-processes", "0"]  # augmentation in the training process: the threads stay as set
    log = work / "log.txt"
    print(f"nnU-Net ({budget.trainer}, {budget.epochs} epochs x {budget.iterations_per_epoch} iterations, "
          f"{budget.device}, mirroring {'on' if budget.mirroring else 'off'}) for {run_dir}, log {log}", flush=True)
    with log.open("w") as f:
        code = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UserError(f"nnU-Net stopped with exit code {code} ({tail[0].strip()}); see {log}")
    return json.loads((work / "stats.json").read_text())


def reference_run(cfg: DictConfig, run_dir: str | os.PathLike, budget: Budget, *, source: str, shots: int | None = None,
                  python: str = sys.executable, processes: int = 1, force: bool = False) -> Path:
    """Export ``cfg``'s split, train nnU-Net on its training cases, score its test cases; returns ``run_dir``.

    A run folder that finished with the same settings is kept (``force`` trains it again)."""
    run_dir = Path(run_dir)
    cfg_data = OmegaConf.to_container(cfg.data, resolve=True)
    cases = reference_cases(cfg_data)
    min_mm3 = float(cfg.trainer.get("eval_min_component_mm3", 0) or 0)
    settings = {**asdict(budget), "dataset": dataset_name(cfg_data), "configuration": "3d_fullres", "fold": "all",
                "train": [str(c["id"]) for c in cases["train"]], "test": [str(c["id"]) for c in cases["test"]],
                "min_component_mm3": min_mm3}
    if not force and _finished(run_dir, settings):
        print(f"{run_dir}: finished earlier with the same settings (kept)", flush=True)
        return run_dir
    for stale in ("nnunet", "eval"):  # an unfinished or other run in this folder: start it over
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    (run_dir / "train_stats.json").unlink(missing_ok=True)
    (run_dir / "nnunet").mkdir(parents=True)
    write_split(cases, run_dir)
    cfg_data["split"] = {**cfg_data.get("split", {}), "file": str(run_dir / "split.json")}
    OmegaConf.save(OmegaConf.create({
        "seed": int(cfg.seed), "peft": {"name": METHOD}, "shots": len(cases["train"]) if shots is None else shots,
        "source": source, "data": cfg_data, "trainer": {"eval_min_component_mm3": min_mm3}, "nnunet": settings,
    }), run_dir / "config.yaml")

    raw = run_dir / "nnunet" / "raw"
    folder = export_dataset(cases, cfg_data, raw)
    channels = range(int(cfg_data.get("in_channels", 1)))
    predict = {str(c["id"]): [str((folder / "imagesTs" / f"{c['id']}_{k:04d}{FILE_ENDING}").resolve()) for k in channels]
               for c in cases["test"]}
    stats = _run_nnunet(run_dir, budget, int(cfg.seed), predict, python, processes)
    summary = evaluate_predictions(run_dir / "nnunet" / "predictions", cases["test"], cfg_data, run_dir / "eval", min_mm3)
    train_stats = {"trainable": stats["trainable"], "best_val_dice": None,  # fold all: nnU-Net validates on its training cases
                   "step_time_s": stats["step_time_s"], "timed_steps": stats["timed_steps"],
                   "peak_memory_mb": stats["peak_memory_mb"], "device": stats["device"], "processes": 1,
                   "budget": budget.name, "shots": len(cases["train"]),
                   **{k: stats[k] for k in ("trainer", "epochs", "iterations_per_epoch", "val_iterations_per_epoch",
                                            "train_s", "plan_and_preprocess_s", "predict_s", "patch_size", "batch_size",
                                            "spacing", "mirroring", "torch_threads", "nnunetv2", "torch")}}
    (run_dir / "train_stats.json").write_text(json.dumps(train_stats, indent=2) + "\n")
    print(markdown_table(summary), end="")
    print(f"nnU-Net {stats['trainer']}: trained {stats['train_s']:.0f} s ({stats['epochs']} epochs x "
          f"{stats['iterations_per_epoch']} iterations, {stats['device']}), test Dice "
          f"{summary['foreground_mean']['Dice']:.2f} %, HD95 {summary['foreground_mean']['HD95']:.2f} mm", flush=True)
    return run_dir
