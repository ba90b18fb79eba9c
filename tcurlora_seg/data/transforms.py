"""MONAI dictionary transforms for the paper's protocol, built from the ``data`` config group.

Every split: load (metadata kept on the MetaTensor: affine, pixdim, file name), channel first, optional
reorientation (``data.orientation``, e.g. RAS) and resampling (``data.spacing``, linear for the image, nearest for
the label), label mapping (``data.label_map`` over the declared ``data.labels``; unlisted values become background),
z-score over the non-zero voxels with the background kept at 0.
"train" adds: pad to ``roi_size``, a random crop of ``roi_size`` (uniform as in the paper, or foreground-biased),
flips with p per axis, intensity scale U(1 - s, 1 + s) then shift U(-o, o). "val"/"test" stop before the crop so
sliding-window inference sees whole volumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai import transforms as mt

from tcurlora_seg.errors import UserError

__all__ = ["KEYS", "label_mapping", "build_transforms"]

KEYS = ("image", "label")
_SPLITS = ("train", "val", "test")


def label_mapping(cfg_data: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    """(orig, target) values for ``MapLabelValued`` from ``data.label_map`` and ``data.labels``; None when no mapping.

    Every declared label value is listed, so that values missing from ``label_map`` map to 0 (e.g. LPBA40: keep the
    two hippocampus labels out of 56 structures).
    """
    label_map = cfg_data.get("label_map")
    if not label_map:
        return None
    labels = cfg_data.get("labels")
    if not labels:
        raise UserError("data.label_map is set but data.labels is empty: declare every label value present in the files")
    mapping = {float(k): float(v) for k, v in dict(label_map).items()}
    undeclared = sorted(set(mapping) - {float(v) for v in labels})
    if undeclared:
        raise UserError(f"data.label_map maps {undeclared} that data.labels does not declare; add them to data.labels")
    orig = [float(v) for v in labels]
    return orig, [mapping.get(v, 0.0) for v in orig]


def _augment(cfg_data: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {"crop": "random", "pos": 1.0, "neg": 1.0, "flip_prob": 0.5, "scale_factor": 0.1, "shift_offset": 0.1, "intensity_prob": 1.0}
    return {**defaults, **dict(cfg_data.get("augment") or {})}


def _crop(cfg_data: Mapping[str, Any], roi: list[int], aug: Mapping[str, Any]) -> mt.Transform:
    if aug["crop"] == "random":  # the paper: a uniform random position
        return mt.RandSpatialCropd(keys=KEYS, roi_size=roi, random_size=False)
    if aug["crop"] == "pos_neg":  # centre on foreground with odds pos:neg (fewer steps to learn small structures)
        return mt.RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=roi, pos=aug["pos"], neg=aug["neg"], num_samples=1)
    raise UserError(f"data.augment.crop={aug['crop']!r}: choose random (paper) or pos_neg (foreground-biased)")


def build_transforms(cfg_data: Mapping[str, Any], split: str) -> mt.Compose:
    """The transform chain for ``split`` ("train" random augmentation; "val"/"test" deterministic, no crop)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    chain: list[mt.Transform] = [
        mt.LoadImaged(keys=KEYS, image_only=True),  # MetaTensor keeps affine / pixdim for HD95 in mm
        mt.EnsureChannelFirstd(keys=KEYS),
    ]
    if cfg_data.get("orientation"):
        # labels given explicitly: MONAI is changing this default and warns otherwise
        chain.append(mt.Orientationd(keys=KEYS, axcodes=str(cfg_data["orientation"]), labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if cfg_data.get("spacing"):
        chain.append(mt.Spacingd(keys=KEYS, pixdim=[float(s) for s in cfg_data["spacing"]], mode=("bilinear", "nearest")))
    mapping = label_mapping(cfg_data)
    if mapping is not None:
        chain.append(mt.MapLabelValued(keys="label", orig_labels=mapping[0], target_labels=mapping[1]))
    chain.append(mt.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    if split == "train":
        roi = [int(s) for s in cfg_data["roi_size"]]
        aug = _augment(cfg_data)
        chain.append(mt.SpatialPadd(keys=KEYS, spatial_size=roi))  # volumes smaller than the crop (e.g. MSD hippocampus)
        chain.append(_crop(cfg_data, roi, aug))
        chain.extend(mt.RandFlipd(keys=KEYS, prob=aug["flip_prob"], spatial_axis=axis) for axis in range(3))
        # paper order: image * U(1 - s, 1 + s) + U(-o, o)
        chain.append(mt.RandScaleIntensityd(keys="image", factors=aug["scale_factor"], prob=aug["intensity_prob"]))
        chain.append(mt.RandShiftIntensityd(keys="image", offsets=aug["shift_offset"], prob=aug["intensity_prob"]))
    return mt.Compose(chain)
