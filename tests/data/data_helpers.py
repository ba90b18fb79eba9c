"""Helpers for tests/data: tiny NIfTI fixtures written with nibabel, and the real data configs composed with Hydra.

A uniquely named module (not conftest) so that ``import`` cannot pick up another folder's conftest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def tiny_case(shape: tuple[int, ...] = (6, 7, 5), seed: int = 0, label_value: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A small image (positive inside a box, 0 outside) and a label blob inside it."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, dtype=np.float32)
    image[1:-1, 1:-1, 1:-1] = rng.uniform(1.0, 2.0, size=tuple(s - 2 for s in shape))
    label = np.zeros(shape, dtype=np.uint8)
    label[2:4, 2:4, 2:3] = label_value
    return image, label


def make_official(root: Path, n: int, lists: dict[str, list[int]] | None = None, shape: tuple[int, ...] = (6, 7, 5)) -> Path:
    """n subjects sub1..subn in the official layout, with train.txt / valid.txt / test.txt when ``lists`` is given."""
    for i in range(1, n + 1):
        image, label = tiny_case(shape, seed=i)
        write_nifti(root / f"sub{i}" / f"sub{i}_img.nii.gz", image)
        write_nifti(root / f"sub{i}" / f"sub{i}_mask.nii.gz", label)
    names = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
    for split, ids in (lists or {}).items():
        (root / names[split]).write_text("".join(f"sub{i}\n" for i in ids))
    return root


def compose_data(name: str = "official", overrides: list[str] | None = None) -> dict[str, Any]:
    """The ``data`` group of configs/train.yaml with ``data=name`` and overrides, as a plain dict."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={name}", *(overrides or [])])
    return OmegaConf.to_container(cfg.data, resolve=True)
