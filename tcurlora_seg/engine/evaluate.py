"""Evaluate a training run on a split: Dice (%) and HD95 (mm) per case, the summary, predicted labels.

Protocol (DESIGN §2 and §5): the run's model(s) with merged adapters, sliding window with gaussian blending, softmax
averaged over ``average_last`` epoch checkpoints (paper: 4), argmax, removal of components below
``min_component_mm3`` (paper: 1000 mm³), see ``engine/inference.py``.

Grid of the scores: the label file's own voxel grid, as stored. When the run's data config reorients or resamples
(``data.orientation`` / ``data.spacing``), the averaged probabilities are inverted onto the image file's grid with
MONAI ``Invertd`` before the argmax; the reference is the label file loaded without any spatial transform (only
``data.label_map``), and the spacing for HD95 and the component volumes is the label header's.

Two HD95 definitions from one inference pass: the argmax of each case is post-processed by the protocol's
``min_component_mm3`` (what ``summary.json``'s top-level numbers, the predictions and the figures use) and also, from
the same argmax, without any removal (``cc0``) and with the paper's removal of components < 1000 mm³ (``cc1000``),
those of the two that differ from the protocol (``COMPONENT_VARIANTS``). Their per-case scores go into
``metrics.csv`` as ``dice_cc1000_<c>``, ``hd95_cc1000_<c>``, ``empty_cc1000_<c>`` (``cc0`` alike), their summaries
into ``summary.json`` under ``component_variants``; ``scores_at`` reads either back by volume.

Writes into ``run_dir/eval/``: ``metrics.csv`` (one row per case), ``summary.json`` (``engine.metrics.summarize``
plus ``evaluation``: the settings and checkpoints used, and ``component_variants``), ``predictions/<id>.nii.gz``
(uint8, the input's affine), ``overlays.png`` and ``dice_per_case.png`` (``engine.figures``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai import transforms as mt
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.data.splits import SPLITS
from tcurlora_seg.data.transforms import channel_indices, label_mapping
from tcurlora_seg.engine.figures import case_slices, plot_dice_per_case, plot_overlays
from tcurlora_seg.engine.inference import Segmenter, select_checkpoints, voxel_spacing, write_mask
from tcurlora_seg.engine.metrics import case_metrics, markdown_table, summarize, write_metrics_csv
from tcurlora_seg.engine.postprocess import remove_small_components
from tcurlora_seg.engine.run import load_run_config
from tcurlora_seg.errors import UserError

__all__ = ["COMPONENT_VARIANTS", "evaluate_run", "load_reference", "check_eval_protocol", "evaluate_after_training",
           "before_after_table", "scores_at"]

# The post-processings every evaluation also scores (name -> min_component_mm3): HD95 (and Dice) with all predicted
# components, and with the paper's removal of components under 1 cm³, whatever the protocol's own volume.
COMPONENT_VARIANTS = {"cc0": 0.0, "cc1000": 1000.0}
GRID = "label file grid as stored (predictions inverted from the model grid with MONAI Invertd when data.orientation/spacing resample)"


def load_reference(path: str | os.PathLike, cfg_data: dict[str, Any]) -> tuple[np.ndarray, tuple[float, ...]]:
    """The label file on its own grid with ``data.label_map`` applied: an int16 (D, H, W) map and its spacing in mm."""
    chain: list[mt.Transform] = [mt.LoadImage(image_only=True), mt.EnsureChannelFirst()]
    mapping = label_mapping(cfg_data)
    if mapping is not None:
        chain.append(mt.MapLabelValue(orig_labels=mapping[0], target_labels=mapping[1]))
    label = mt.Compose(chain)(os.fspath(path))
    return np.rint(label.numpy()[0]).astype(np.int16), voxel_spacing(label.affine)


def _on_label_grid(image: str, reference: np.ndarray) -> bool:
    """Whether the image file (header only) is on the label's grid: the overlays cut both at the same indices (the data
    check allows other grids only for resampling configs)."""
    return tuple(nib.load(image).shape[:3]) == reference.shape


def _image_volume(image: str, cfg_data: dict[str, Any]) -> np.ndarray:
    """The image file as stored; of a 4-D file, the first channel that ``data.modality`` picks (the model's input)."""
    volume = mt.LoadImage(image_only=True)(image).numpy()
    return volume[..., (channel_indices(cfg_data) or [0])[0]] if volume.ndim == 4 else volume


def _cases(cfg_data: dict[str, Any], split: str, run_dir: Path) -> list[dict[str, Any]]:
    if split not in SPLITS:
        raise UserError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    cases = load_cases(cfg_data)[split]
    if not cases:
        raise UserError(
            f"data.split in {run_dir / 'config.yaml'} gives no {split} cases (data.root={cfg_data.get('root')}); "
            f"evaluate another split (split=val) or list the cases (data.split.{split} / its list file)"
        )
    return cases


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    checkpoint: str = "best",
    average_last: int | None = None,
    min_component_mm3: float | None = None,
    overlap: float | None = None,
    split: str = "test",
    save_predictions: bool = True,
    device: str = "auto",
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Evaluate ``run_dir`` on ``split``; write ``eval/`` files, print the Markdown table, return the summary.

    Args:
        run_dir: a run folder (``engine/run.py``): ``config.yaml`` supplies data and model.
        checkpoint: best | last | epoch_NNNN | a .pt path; ignored when ``average_last`` > 1.
        average_last: K > 1 averages the softmax of the last K kept ``epoch_*.pt`` (paper: 4); None or 1: one checkpoint.
        min_component_mm3: remove predicted components smaller than this (paper: 1000); None or 0 keeps them all.
        overlap: sliding-window overlap (None: 0.5, gaussian blending).
        split: train | val | test, from the run's data config.
        save_predictions: write ``eval/predictions/<id>.nii.gz``.
        device: auto | cpu | cuda | cuda:N for the windows; volumes are stitched on the CPU.
        progress: a tqdm bar on stderr.
        out_dir: where the files go (default ``run_dir/eval``).
        figures: write ``overlays.png`` and ``dice_per_case.png``.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    cfg_data = OmegaConf.to_container(cfg.data, resolve=True)
    cases = _cases(cfg_data, split, run_dir)
    names = select_checkpoints(run_dir, checkpoint, average_last)
    segmenter = Segmenter.from_run(run_dir, names, overlap=overlap, min_component_mm3=min_component_mm3, device=device)

    out = Path(out_dir) if out_dir is not None else run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    min_mm3 = segmenter.min_component_mm3
    variants = {name: v for name, v in COMPONENT_VARIANTS.items() if v != min_mm3}
    argmax = dataclasses.replace(segmenter, min_component_mm3=0.0)  # the same models; every removal is done below
    per_case, slices, images = [], [], {}
    scored: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    bar = tqdm(cases, desc=f"eval {split}", unit="case", disable=not progress)
    for case in bar:
        raw, affine = argmax.segment(case["image"])
        # removal on the image file's spacing, as Segmenter.postprocess does it: the protocol's mask is segment()'s
        masks = {v: remove_small_components(raw, voxel_spacing(affine), v) if v > 0 else raw
                 for v in {min_mm3, *variants.values()}}
        mask = masks[min_mm3]
        reference, spacing = load_reference(case["label"], cfg_data)
        result = case_metrics(mask, reference, spacing, segmenter.num_classes, case_id=case["id"])
        per_case.append(result)
        for name, v in variants.items():
            scored[name].append(case_metrics(masks[v], reference, spacing, segmenter.num_classes, case_id=case["id"]))
        dice = float(np.mean([m["Dice"] for m in result["metrics"].values()]))
        bar.set_postfix(dice=f"{dice:.1f}")
        image = case["image"] if isinstance(case["image"], str) else case["image"][0]
        if save_predictions:
            write_mask(out / "predictions" / f"{case['id']}.nii.gz", mask, image)
        if figures and _on_label_grid(image, reference):
            slices.append(case_slices(case["id"], dice, reference, mask))
            images[case["id"]] = image

    summary = summarize(per_case)
    summary["evaluation"] = {
        "run_dir": str(run_dir),
        "split": split,
        "n_cases": len(per_case),
        "checkpoints": segmenter.checkpoints,
        "average_last": len(names) if len(names) > 1 else 1,
        "overlap": segmenter.inferer.overlap,
        "blend_mode": "gaussian",
        "roi_size": list(segmenter.inferer.roi_size),
        "min_component_mm3": segmenter.min_component_mm3,
        "grid": GRID,
        "device": str(segmenter.device),
    }
    summary["component_variants"] = {name: _variant_summary(scored[name], v) for name, v in variants.items()}
    write_metrics_csv(out / "metrics.csv", per_case, scored)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if figures:
        title = f"{run_dir.name}: {cfg.peft.name}, checkpoint {'+'.join(names)}, {split} split ({len(per_case)} cases)"
        plot_overlays(slices, out / "overlays.png", title, image_of=lambda c: _image_volume(images[c.case_id], cfg_data))
        plot_dice_per_case([str(c["id"]) for c in per_case],
                           [float(np.mean([m["Dice"] for m in c["metrics"].values()])) for c in per_case],
                           out / "dice_per_case.png", title)
    print(markdown_table(summary), end="")
    return summary


def _variant_summary(per_case: list[dict[str, Any]], min_mm3: float) -> dict[str, Any]:
    """The summary of a variant's scores without what the protocol's summary already holds (cases, definitions)."""
    summary = summarize(per_case)
    return {"min_component_mm3": min_mm3, **{k: summary[k] for k in ("mean", "std", "median", "foreground_mean", "empty_cases")}}


def scores_at(summary: dict[str, Any], min_component_mm3: float) -> tuple[dict[str, float], str | None] | None:
    """The foreground-mean scores of ``summary`` (a ``summary.json``) after removing components smaller than
    ``min_component_mm3``, and the ``metrics.csv`` variant name holding their per-case values (None: the protocol's
    own columns); None when the evaluation did not score that volume. A summary without ``evaluation`` (from before
    the key) ran the default protocol, no removal."""
    protocol = (summary.get("evaluation") or {}).get("min_component_mm3") or 0.0
    if float(protocol) == float(min_component_mm3):
        return (summary["foreground_mean"], None) if "foreground_mean" in summary else None
    for name, part in (summary.get("component_variants") or {}).items():
        if float(part["min_component_mm3"]) == float(min_component_mm3):
            return part["foreground_mean"], name
    return None


def check_eval_protocol(cfg: DictConfig) -> tuple[int, float]:
    """``trainer.eval_average_last`` and ``trainer.eval_min_component_mm3``, checked before training rather than after
    it (an average over more epochs than training keeps would only fail at the end). Runs from before these keys: 1, 0."""
    trainer = cfg.trainer
    k, min_mm3 = trainer.get("eval_average_last", 1), trainer.get("eval_min_component_mm3", 0)
    keep = trainer.get("keep_last_epochs", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"trainer.eval_average_last={k!r}: use 1 (the best checkpoint) or K > 1 (the last K epochs; paper: 4)")
    if k > 1 and k > keep:
        raise UserError(f"trainer.eval_average_last={k} needs the last {k} epochs, but trainer.keep_last_epochs={keep} "
                        f"keeps fewer: raise trainer.keep_last_epochs to {k} or lower trainer.eval_average_last")
    if isinstance(min_mm3, bool) or not isinstance(min_mm3, (int, float)) or not 0 <= min_mm3 < float("inf"):
        raise UserError(f"trainer.eval_min_component_mm3={min_mm3!r}: use 0 (keep every component) or a volume in mm³ "
                        "(paper: 1000)")
    return k, float(min_mm3)


def evaluate_after_training(cfg: DictConfig, run_dir: Path) -> None:
    """The test split with the best checkpoint (and, when kept, the model before fine-tuning, for comparison), by the
    protocol of `make eval` with ``trainer.eval_average_last`` and ``trainer.eval_min_component_mm3``."""
    average_last, min_mm3 = check_eval_protocol(cfg)
    before = None
    if (run_dir / "checkpoints" / "pretrained.pt").is_file():
        logging.getLogger("tcurlora_seg").info("evaluating the model before fine-tuning (zero adapter = the pretrained source model)")
        before = evaluate_run(run_dir, checkpoint="pretrained", min_component_mm3=min_mm3, out_dir=run_dir / "eval_pretrained",
                              save_predictions=False, progress=bool(cfg.trainer.progress))
    after = evaluate_run(run_dir, average_last=average_last, min_component_mm3=min_mm3, progress=bool(cfg.trainer.progress))
    if before is not None:
        print(before_after_table(before, after))


def before_after_table(before: dict, after: dict) -> str:
    """The test split's foreground-mean Dice and HD95 before fine-tuning (zero-shot), after, and the change."""
    rows = [f"{'test (foreground mean)':<24}{'before (zero-shot)':>20}{'after':>10}{'change':>10}"]
    for key, unit in (("Dice", "%"), ("HD95", "mm")):
        b, a = before["foreground_mean"][key], after["foreground_mean"][key]
        rows.append(f"{key + ' ' + unit:<24}{b:>20.2f}{a:>10.2f}{a - b:>+10.2f}")
    return "\n".join(rows)
