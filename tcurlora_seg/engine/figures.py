"""The pictures of an evaluation: what the model segmented, and how Dice spreads over the cases.

    eval/overlays.png        a row per case (best and worst by Dice marked, then the others up to a few): the image
                             in three planes through the label's largest cross-sections, label outlined in green,
                             prediction in red
    eval/dice_per_case.png   foreground-mean Dice of every case, sorted, with the mean

Only the label's and the prediction's three 2-D slices of each case are kept while the split is evaluated (not the
volumes); the image is read again for the few cases the figure shows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["CaseSlices", "case_slices", "with_image", "plot_overlays", "plot_dice_per_case"]

PLANES = ("sagittal", "coronal", "axial")  # a slice across axis 0, 1, 2 of the array
MAX_ROWS = 4


@dataclass
class CaseSlices:
    case_id: str
    dice: float
    centre: tuple[int, int, int]  # the slice index per plane
    label: list[np.ndarray]  # one 2-D slice per plane
    pred: list[np.ndarray]
    image: list[np.ndarray] | None = None  # cut only for the cases a figure shows (``with_image``)


def case_slices(case_id: str, dice: float, label: np.ndarray, pred: np.ndarray) -> CaseSlices:
    """Per plane, the slice with the most label voxels (the middle of the label's extent among equals; the volume's
    centre when the label is empty): with several lesions, the biggest cross-section rather than a gap between them."""
    centre = []
    for axis in range(3):
        area = (label > 0).sum(axis=tuple(a for a in range(3) if a != axis))
        best = np.flatnonzero(area == area.max()) if label.any() else [label.shape[axis] // 2]
        centre.append(int(best[len(best) // 2]))
    return CaseSlices(case_id, float(dice), tuple(centre), [_cut(label, centre, a) for a in range(3)],
                      [_cut(pred, centre, a) for a in range(3)])


def with_image(case: CaseSlices, image: np.ndarray) -> CaseSlices:
    """``case`` with the image volume (on the label's grid) cut at its slices."""
    return replace(case, image=[_cut(image, case.centre, a).astype(np.float32) for a in range(3)])


def _cut(volume: np.ndarray, centre: Sequence[int], axis: int) -> np.ndarray:
    return np.take(volume, centre[axis], axis=axis)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _chosen(cases: Sequence[CaseSlices]) -> list[tuple[CaseSlices, str]]:
    """Best and worst by Dice first, then the other cases in their order, up to MAX_ROWS."""
    ranked = sorted(cases, key=lambda c: c.dice)
    marks = {id(ranked[-1]): "best", id(ranked[0]): "worst"} if len(ranked) > 1 else {id(ranked[0]): "only case"}
    order = [ranked[-1], ranked[0]] if len(ranked) > 1 else [ranked[0]]
    order += [c for c in cases if id(c) not in marks][: MAX_ROWS - len(order)]
    return [(c, marks.get(id(c), "")) for c in order]


def plot_overlays(cases: Sequence[CaseSlices], path: str | os.PathLike, title: str,
                  image_of: Callable[[CaseSlices], np.ndarray] | None = None) -> Path | None:
    """``overlays.png``; None when there are no cases. ``image_of``: the image volume of a case without its image
    slices, called for the shown cases only (an evaluation reads a few images again, not the whole split)."""
    if not cases:
        return None
    plt = _pyplot()
    rows = [(case if case.image is not None else with_image(case, image_of(case)), mark) for case, mark in _chosen(cases)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (case, mark) in enumerate(rows):
        for p, plane in enumerate(PLANES):
            ax = axes[r][p]
            # arrays are (x, y) in voxel order: transposed and flipped so that up is up in the picture
            show = lambda a: np.flipud(a.T)  # noqa: E731
            ax.imshow(show(case.image[p]), cmap="gray")
            for mask, colour in ((case.label[p], "lime"), (case.pred[p], "red")):
                if mask.any():
                    ax.contour(show((mask > 0).astype(float)), levels=[0.5], colors=colour, linewidths=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if p == 0:
                ax.set_ylabel(f"{case.case_id}\nDice {case.dice:.1f} %" + (f" ({mark})" if mark else ""))
            if r == 0:
                ax.set_title(plane)
    fig.suptitle(f"{title}\nlabel green, prediction red", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_dice_per_case(ids: Sequence[str], dice: Sequence[float], path: str | os.PathLike, title: str) -> Path | None:
    """``dice_per_case.png``: a bar per case, sorted by Dice, and the mean; None when there are no cases."""
    if not ids:
        return None
    plt = _pyplot()
    order = np.argsort(dice)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(ids) + 2), 3.5))
    ax.bar(range(len(ids)), [dice[i] for i in order], color="tab:blue")
    ax.axhline(float(np.mean(dice)), color="black", linestyle="--", label=f"mean {np.mean(dice):.1f} %")
    ax.set_xticks(range(len(ids)), [ids[i] for i in order], rotation=90, fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("Dice % (foreground mean)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
