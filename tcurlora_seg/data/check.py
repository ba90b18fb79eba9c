"""Integrity check of a dataset before training: ``python -m tcurlora_seg.data.check [overrides]``.

Every case: files exist and load; image and label shapes agree; affines agree within ``data.affine_tol``; the
image channels (a 4-D file's after ``data.modality`` picks some) number ``data.in_channels``; label values are in
``data.labels``; no NaN/Inf; the label of a training case is not empty after ``data.label_map``
(a warning for val/test). All problems are collected and printed together, one line each naming the file, and the
command exits with code 2 (``run_check`` returns 2 for the training entry point to do the same before any model is
built). Exit code 0 prints a one-line summary.

Examples::

    python -m tcurlora_seg.data.check                       # the demo (built on first use)
    python -m tcurlora_seg.data.check data=eadc data.root=Datasets/EADC
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import nibabel as nib
import numpy as np

from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.data.splits import SPLITS, write_split
from tcurlora_seg.data.transforms import channel_indices, label_mapping
from tcurlora_seg.errors import UserError

__all__ = ["CheckResult", "check_dataset", "run_check", "main"]


class CheckResult(NamedTuple):
    """Problems stop the run; warnings are printed and the run goes on."""

    problems: list[str]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _load(path: str, problems: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(data, affine) of a NIfTI file, or None after recording why it cannot be used."""
    if not Path(path).is_file():
        problems.append(f"{path}: file not found")
        return None
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for corrupt files; all mean "cannot be read"
        problems.append(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})".replace("\n", " "))
        return None
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            problems.append(f"{path}: {bad} NaN/Inf voxel(s); fix or re-export the file")
            return None
    return data, img.affine


def _foreground_values(cfg_data: Mapping[str, Any]) -> set[float] | None:
    """Raw label values that end up as foreground after the label mapping (None: every non-zero value)."""
    mapping = label_mapping(cfg_data)
    return None if mapping is None else {o for o, t in zip(*mapping) if t != 0}


def _check_case(case: Mapping[str, Any], split: str, cfg_data: Mapping[str, Any], problems: list[str], warnings: list[str]) -> None:
    images = case["image"] if isinstance(case["image"], (list, tuple)) else [case["image"]]
    label_path = str(case["label"])
    label = _load(label_path, problems)
    loaded = [(str(p), _load(str(p), problems)) for p in images]
    tol = float(cfg_data.get("affine_tol", 1e-3))
    picked = channel_indices(cfg_data)
    channels, counted = 0, all(item is not None for _, item in loaded)
    for path, item in loaded:
        if item is None or label is None:
            continue
        data, affine = item
        if data.ndim == 4 and picked is not None and max(picked) >= data.shape[3]:
            problems.append(f"{path}: {data.shape[3]} channel(s) in its 4th axis, but data.modality={picked} asks for "
                            f"channel {max(picked)}; choose indices from 0 to {data.shape[3] - 1}")
            counted = False  # the channel count below would only repeat this
            continue
        # a 4-D file gives the channels data.modality picks (all when null), a 3-D file one
        channels += (len(picked) if picked is not None else data.shape[3]) if data.ndim == 4 else 1
        spatial = data.shape[:3]
        label_shape = label[0].shape[:3]
        if tuple(spatial) != tuple(label_shape):
            problems.append(f"{label_path}: shape {tuple(label_shape)} differs from image {path} shape {tuple(spatial)}")
        diff = float(np.abs(affine - label[1]).max())
        if diff > tol:
            problems.append(f"{label_path}: affine differs from image {path} by {diff:.4g} (> data.affine_tol={tol:g}); resample or fix the header")
    expected = cfg_data.get("in_channels")
    if expected is not None and channels and counted and channels != int(expected):
        problems.append(f"{images[0]}: case {case['id']} has {channels} image channel(s) but data.in_channels={expected}")
    if label is None:
        return
    if label[0].ndim > 3 and int(np.prod(label[0].shape[3:])) > 1:
        problems.append(f"{label_path}: label is {label[0].ndim}-D {label[0].shape}; store one 3-D label volume")
    values = np.unique(label[0])
    declared = cfg_data.get("labels")
    if declared:
        extra = sorted(set(values.tolist()) - {float(v) for v in declared})
        if extra:
            shown = ", ".join(f"{v:g}" for v in extra[:10]) + (", ..." if len(extra) > 10 else "")
            problems.append(f"{label_path}: label value(s) {shown} not in data.labels {list(declared)}; declare them or fix the file")
    foreground = _foreground_values(cfg_data)
    present = {float(v) for v in values}
    empty = not (present & foreground if foreground is not None else present - {0.0})
    if empty and split == "train":
        problems.append(f"{label_path}: empty label (no foreground after data.label_map) in training case {case['id']}; drop or fix it")
    elif empty:
        warnings.append(f"{label_path}: empty label (no foreground after data.label_map) in {split} case {case['id']}")


def check_dataset(cfg_data: Mapping[str, Any], cases: Mapping[str, Sequence[Mapping[str, Any]]]) -> CheckResult:
    """Check every case of every split; return all problems and warnings, one line each."""
    problems: list[str] = []
    warnings: list[str] = []
    if not cases.get("train"):
        problems.append(f"{cfg_data.get('root')}: no training cases in the split; check data.split and the list files")
    seen: dict[str, str] = {}
    for split in SPLITS:
        for case in cases.get(split, []):
            if case["id"] in seen:
                problems.append(f"{case['label']}: case {case['id']} is in both {seen[case['id']]} and {split}; splits must be disjoint")
                continue
            seen[case["id"]] = split
            _check_case(case, split, cfg_data, problems, warnings)
    return CheckResult(problems, warnings)


def run_check(
    cfg_data: Mapping[str, Any],
    cases: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    run_dir: str | Path | None = None,
    stream: TextIO | None = None,
) -> int:
    """Load (unless given) and check the cases, print the report; return 0 (OK) or 2 (problems). Writes split.json to run_dir."""
    out = stream or sys.stderr
    try:
        cases = cases if cases is not None else load_cases(cfg_data)
        result = check_dataset(cfg_data, cases)
    except UserError as err:
        print(f"error: {err}", file=out)
        return 2
    for line in result.warnings:
        print(f"warning: {line}", file=out)
    if result.problems:
        for line in result.problems:
            print(f"error: {line}", file=out)
        print(f"error: {len(result.problems)} problem(s) in data.root={cfg_data.get('root')}; fix them and rerun", file=out)
        return 2
    if run_dir is not None:
        write_split(cases, run_dir)
    counts = " / ".join(f"{s} {len(cases.get(s, []))}" for s in SPLITS)
    print(f"data OK: {cfg_data.get('layout')} at {cfg_data.get('root')}: {counts} cases, {len(result.warnings)} warning(s)", file=stream or sys.stdout)
    return 0


def main() -> None:
    """Hydra entry point composing configs/train.yaml; exit code 2 on problems."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path="../../configs", config_name="train")
    def _check(cfg: DictConfig) -> None:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        sys.exit(run_check(data, run_dir=HydraConfig.get().runtime.output_dir))

    _check()


if __name__ == "__main__":
    main()
