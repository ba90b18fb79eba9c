"""Per-case Dice and HD95, and the nnU-Net-style summary (``summary.json``, a CSV and a Markdown table).

Definitions (the same text goes into ``summary.json`` under ``definitions``):

* Dice, in %: ``200 * |P ∩ G| / (|P| + |G|)`` per foreground class and case, P the prediction and G the reference.
  The summary reports the mean over cases (nnU-Net convention), not a "global" Dice over summed voxels.
* HD95, in mm: MONAI ``compute_hausdorff_distance(percentile=95, spacing=<header spacing>)``. Surface voxels of P and G
  (each mask minus its erosion), the Euclidean distance in mm from every surface voxel of one mask to the nearest
  surface voxel of the other, the 95th percentile of each of the two directions, and the larger of the two (symmetric).
  This is neither the maximum Hausdorff distance (SimpleITK, what the official code calls hd95) nor medpy's percentile
  of the pooled distances.
* Empty masks. Both empty: Dice 100, HD95 0 (the structure is correctly absent). Exactly one empty: Dice 0 and HD95 =
  the image diagonal in mm, ``sqrt(sum((shape_i * spacing_i)^2))``, a finite worst case; MONAI would give NaN or inf,
  which drops out of a mean and makes a model that misses structures look better. Every such case is flagged
  (``"empty": "prediction"`` or ``"reference"``) and counted in the summary's ``empty_cases``.
* Metrics are computed on the post-processed prediction at the reference's resolution. An evaluation can score the
  same prediction under other post-processings too (``engine.evaluate``: with and without the paper's removal of
  components under 1 cm³); ``metrics.csv`` then has their columns beside the protocol's, ``dice_<variant>_<c>`` etc.
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from monai.utils import convert_data_type

from tcurlora_seg.engine.postprocess import check_spacing
from tcurlora_seg.errors import UserError

__all__ = ["DEFINITIONS", "case_means", "case_metrics", "markdown_table", "summarize", "write_metrics_csv"]

DEFINITIONS = {
    "Dice": "200*|P∩G|/(|P|+|G|) per foreground class and case, in %; summary values are over cases",
    "HD95": (
        "symmetric 95th-percentile Hausdorff distance in mm (MONAI compute_hausdorff_distance, percentile=95, "
        "image spacing): max of the 95th percentiles of the two directed surface-to-surface distances"
    ),
    "empty_policy": (
        "both masks empty: Dice 100, HD95 0; exactly one empty: Dice 0, HD95 = image diagonal in mm "
        "(sqrt(sum((shape*spacing)^2))), flagged and counted in empty_cases"
    ),
    "std": "population standard deviation over cases (ddof=0)",
    "foreground_mean": "mean over foreground classes of the per-class means",
}
_METRICS = ("Dice", "HD95")


def _label_map(array: np.ndarray | torch.Tensor, name: str, case: str) -> np.ndarray:
    labels, *_ = convert_data_type(array, np.ndarray)
    if labels.ndim == 4 and labels.shape[0] == 1:  # channel-first (1, D, H, W)
        labels = labels[0]
    if labels.ndim != 3:
        raise UserError(f"case {case}: {name} has shape {labels.shape}; expected a label map (D, H, W) or (1, D, H, W)")
    return labels


def _hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> float:
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated `always_return_as_numpy` internally; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None],  # (B=1, C=1, D, H, W)
            torch.from_numpy(ref)[None, None],
            include_background=True,  # the single channel is the foreground class
            percentile=95,
            spacing=list(spacing),
        )
    return float(hd.item())


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    num_classes: int,
    *,
    case_id: str | None = None,
) -> dict[str, Any]:
    """Dice (%) and HD95 (mm) of one case for every foreground class 1..num_classes-1.

    Args:
        pred, label: label maps (D, H, W) or (1, D, H, W) of ints in 0..num_classes-1, on the same grid.
        spacing: voxel size in mm per axis, from the reference image header.
        num_classes: classes including background.
        case_id: written into the result as ``id``.

    Returns:
        ``{"id": case_id, "metrics": {"1": {"Dice", "HD95", "n_pred", "n_ref", "empty"}, ...}}`` with ``empty`` None,
        "both", "prediction" or "reference" (see the module docstring for the empty-mask policy).
    """
    case = str(case_id)
    pred, label = _label_map(pred, "prediction", case), _label_map(label, "label", case)
    if pred.shape != label.shape:
        raise UserError(
            f"case {case}: prediction shape {pred.shape} differs from label shape {label.shape}; "
            "resample the prediction to the label's grid before scoring"
        )
    spacing = check_spacing(spacing, 3)
    for name, labels in (("prediction", pred), ("label", label)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(
                f"case {case}: {name} has values outside 0..{num_classes - 1}; set num_classes (model.out_channels) "
                "or merge the label values"
            )
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing)))

    metrics: dict[str, dict[str, Any]] = {}
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        n_pred, n_ref = int(p.sum()), int(g.sum())
        if n_pred == 0 and n_ref == 0:
            dice, hd95, empty = 100.0, 0.0, "both"
        elif n_pred == 0 or n_ref == 0:
            dice, hd95, empty = 0.0, diagonal, "prediction" if n_pred == 0 else "reference"
        else:
            dice = 200.0 * int(np.logical_and(p, g).sum()) / (n_pred + n_ref)
            hd95, empty = _hd95(p, g, spacing), None
        metrics[str(c)] = {"Dice": dice, "HD95": hd95, "n_pred": n_pred, "n_ref": n_ref, "empty": empty}
    return {"id": case_id, "metrics": metrics}


def _classes(per_case: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({c for case in per_case for c in case["metrics"]}, key=int)


def summarize(
    per_case: Sequence[Mapping[str, Any]], *, class_names: Mapping[str | int, str] | None = None
) -> dict[str, Any]:
    """Build the ``summary.json`` body from :func:`case_metrics` results.

    nnU-Net's keys (``metric_per_case``, ``mean``, ``foreground_mean``) with HD95 added, plus ``std``, ``median``,
    ``n``, ``empty_cases`` (per class: how many cases had an empty prediction, reference or both) and ``definitions``.
    """
    if not per_case:
        raise UserError("no cases to summarize; check that the evaluation split lists cases")
    classes = _classes(per_case)
    values = {c: {m: np.array([case["metrics"][c][m] for case in per_case if c in case["metrics"]]) for m in _METRICS}
              for c in classes}  # fmt: skip
    mean = {c: {m: float(values[c][m].mean()) for m in _METRICS} for c in classes}
    summary: dict[str, Any] = {
        "metric_per_case": list(per_case),
        "mean": mean,
        "std": {c: {m: float(values[c][m].std()) for m in _METRICS} for c in classes},
        "median": {c: {m: float(np.median(values[c][m])) for m in _METRICS} for c in classes},
        "foreground_mean": {m: float(np.mean([mean[c][m] for c in classes])) for m in _METRICS},
        "n": len(per_case),
        "empty_cases": {
            c: {
                f"{kind}_empty": sum(case["metrics"].get(c, {}).get("empty") == kind for case in per_case)
                for kind in ("prediction", "reference", "both")
            }
            for c in classes
        },
        "definitions": {**DEFINITIONS, "units": {"Dice": "%", "HD95": "mm"}},
    }
    if class_names:
        summary["class_names"] = {str(k): v for k, v in class_names.items()}
    return summary


def write_metrics_csv(
    path: str | os.PathLike,
    per_case: Sequence[Mapping[str, Any]],
    variants: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> None:
    """One row per case: ``id``, then ``dice_<c>`` (%), ``hd95_<c>`` (mm) and ``empty_<c>`` for each class c; then,
    for each ``variants`` name v (the same cases scored after another post-processing, in the same order),
    ``dice_<v>_<c>``, ``hd95_<v>_<c>`` and ``empty_<v>_<c>``."""
    variants = dict(variants or {})
    for name, cases in variants.items():
        if [c.get("id") for c in cases] != [c.get("id") for c in per_case]:
            raise ValueError(f"variant {name!r} scores other cases than the protocol")
    classes = _classes(per_case)
    prefixes = [""] + [f"{name}_" for name in variants]
    header = ["id"] + [f"{name}_{p}{c}" for p in prefixes for c in classes for name in ("dice", "hd95", "empty")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, case in enumerate(per_case):
            row: list[Any] = [case.get("id")]
            for scored in [case, *(cases[i] for cases in variants.values())]:
                for c in classes:
                    m = scored["metrics"].get(c)
                    row += [m["Dice"], m["HD95"], m["empty"] or ""] if m else ["", "", ""]
            writer.writerow(row)


def case_means(path: str | os.PathLike, metric: str = "dice", variant: str | None = None) -> dict[str, float]:
    """Per case id, the foreground mean (over classes) of ``metric`` (dice | hd95) from a ``metrics.csv`` of
    :func:`write_metrics_csv`, the protocol's columns or those of ``variant``; {} when the file or the columns are
    missing (an evaluation from before the variant was recorded)."""
    if not os.path.isfile(path):
        return {}
    pattern = re.compile(rf"{metric}_{re.escape(variant) + '_' if variant else ''}(\d+)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames or [] if pattern.fullmatch(c)]
        means = {}
        for row in reader:
            values = [float(row[c]) for c in columns if row[c] not in ("", None)]
            if values:
                means[str(row["id"])] = float(np.mean(values))
    return means


def markdown_table(summary: Mapping[str, Any]) -> str:
    """A Markdown table of the summary: mean ± std (median) per class and the foreground mean."""
    names = summary.get("class_names", {})
    lines = [
        "| class | cases | Dice % mean ± std (median) | HD95 mm mean ± std (median) | one mask empty |",
        "|---|---|---|---|---|",
    ]
    for c, mean in summary["mean"].items():
        std, median, empty = summary["std"][c], summary["median"][c], summary["empty_cases"][c]
        cells = [f"{mean[m]:.2f} ± {std[m]:.2f} ({median[m]:.2f})" for m in _METRICS]
        one_empty = empty["prediction_empty"] + empty["reference_empty"]
        label = f"{c} ({names[c]})" if c in names else c
        lines.append(f"| {label} | {summary['n']} | {cells[0]} | {cells[1]} | {one_empty} |")
    fg = summary["foreground_mean"]
    lines.append(f"| foreground mean | {summary['n']} | {fg['Dice']:.2f} | {fg['HD95']:.2f} | |")
    return "\n".join(lines) + "\n"
