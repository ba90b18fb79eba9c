"""Datasets and loaders: ``data.cache`` none | memory (CacheDataset) | disk (PersistentDataset under ``data.cache_dir``).

Caching stores the deterministic head of the chain (load, resample, map labels, normalise); the random crop and
augmentation run afresh each epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing

from tcurlora_seg.data.transforms import build_transforms
from tcurlora_seg.errors import UserError

__all__ = ["CACHE_MODES", "build_dataset", "build_loader"]

CACHE_MODES = ("none", "memory", "disk")


def build_dataset(
    cfg_data: Mapping[str, Any], cases: Sequence[Mapping[str, Any]], split: str, transform: Any | None = None
) -> Dataset:
    """A MONAI dataset over ``cases`` with ``build_transforms(cfg_data, split)`` (or ``transform``)."""
    transform = transform if transform is not None else build_transforms(cfg_data, split)
    data = [dict(c) for c in cases]
    mode = str(cfg_data.get("cache") or "none")
    if mode == "none":
        return Dataset(data, transform)
    if mode == "memory":
        workers = max(1, int(cfg_data.get("num_workers") or 0))
        return CacheDataset(data, transform, cache_rate=float(cfg_data.get("cache_rate", 1.0)), num_workers=workers, progress=False)
    if mode == "disk":
        cache_dir = Path(str(cfg_data.get("cache_dir") or ".cache/persistent")) / split
        cache_dir.mkdir(parents=True, exist_ok=True)
        # the transform's hash is part of each key, so changing data.* preprocessing never reuses stale entries
        return PersistentDataset(data, transform, cache_dir=cache_dir, hash_transform=pickle_hashing, track_meta=True)
    raise UserError(f"data.cache={mode!r}: choose one of {', '.join(CACHE_MODES)}")


def build_loader(cfg_data: Mapping[str, Any], dataset: Dataset, split: str, sampler: Any | None = None,
                 seed: int | None = None) -> DataLoader:
    """Training: ``data.batch_size``, shuffled (unless a sampler, e.g. DistributedSampler, is given).

    Validation / test: batch 1, in order, because whole volumes differ in size.
    ``seed``: the loader draws the case order, the random transforms' states and the workers' seeds from a generator
    of its own, so they do not depend on how many random numbers the model drew meanwhile (peft's LoHa and LoKr
    draw one per layer per training step for their module dropout): every method of a seed sees the same cases in
    the same order with the same crops and flips (common random numbers).
    """
    train = split == "train"
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=int(cfg_data.get("batch_size", 1)) if train else 1,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=int(cfg_data.get("num_workers") or 0),
        generator=generator,
    )
