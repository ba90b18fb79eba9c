"""MONAI dictionary transforms for the paper's protocol, built from the ``data`` config group.

Every split: load (metadata kept on the MetaTensor: affine, pixdim, file name), the ``data.modality`` channels of a
4-D file (MSD Task01: FLAIR, T1w, T1gd, T2w in the 4th axis), channel first, optional
reorientation (``data.orientation``, e.g. RAS) and resampling (``data.spacing``, linear for the image, nearest for
the label), label mapping (``data.label_map`` over the declared ``data.labels``; unlisted values become background),
z-score over the non-zero voxels with the background kept at 0.
"train" adds: pad to ``roi_size``, a random crop of ``roi_size`` (uniform as in the paper, or foreground-biased),
flips with p per axis, intensity scale U(1 - s, 1 + s) then shift U(-o, o). "val"/"test" stop before the crop so
sliding-window inference sees whole volumes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai import transforms as mt

from tcurlora_seg.errors import UserError

__all__ = ["KEYS", "SelectChannelsd", "channel_indices", "label_mapping", "build_transforms", "user_error_of"]

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


def channel_indices(cfg_data: Mapping[str, Any]) -> list[int] | None:
    """``data.modality`` as channel indices (an int or a list of ints), or None: null (every channel) or BraTS names
    (which the brats2021 layout turns into files)."""
    modality = cfg_data.get("modality")
    wanted = [modality] if isinstance(modality, int) and not isinstance(modality, bool) else modality
    if not isinstance(wanted, (list, tuple)) or not wanted or not all(isinstance(c, int) and not isinstance(c, bool) for c in wanted):
        return None
    if any(c < 0 for c in wanted):
        raise UserError(f"data.modality={list(wanted)}: channel indices count from 0; give indices >= 0")
    return [int(c) for c in wanted]


def multichannel_file(image: torch.Tensor) -> bool:
    """Whether ``image`` (as LoadImage returns it) is one file with channels in its 4th axis; False for a 3-D file and
    for per-channel files stacked by LoadImage (nnU-Net's ``_0000``, ``_0001``: the layout already chose those)."""
    return image.ndim == 4 and getattr(image, "meta", {}).get("original_channel_dim") == -1


class SelectChannelsd(mt.MapTransform):
    """Keep ``channels`` of an image read from one 4-D file (channels last, as NIfTI stores them), before
    ``EnsureChannelFirstd``; 3-D files and stacked per-channel files pass unchanged.

    The exported bundle does the same with a MONAI ``Lambdad`` (``engine/bundle.py``): keep them alike.
    """

    def __init__(self, keys: str | Sequence[str], channels: Sequence[int]) -> None:
        super().__init__(keys)
        self.channels = [int(c) for c in channels]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not multichannel_file(image):
                continue
            count = image.shape[-1]
            if max(self.channels) >= count:
                name = image.meta.get("filename_or_obj", key)
                raise UserError(f"{name}: {count} channel(s) in its 4th axis, but data.modality={self.channels} asks for "
                                f"channel {max(self.channels)}; choose indices from 0 to {count - 1}")
            d[key] = image[..., self.channels]  # (D, H, W, C) -> (D, H, W, len(channels)), metadata kept
        return d


def user_error_of(err: BaseException) -> UserError | None:
    """The UserError a transform raised inside a MONAI Compose (which wraps it in RuntimeErrors), or None."""
    while err is not None and not isinstance(err, UserError):
        err = err.__cause__
    return err


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
    ]
    channels = channel_indices(cfg_data)
    if channels is not None:  # a 4-D file's channels (MSD Task01); nnU-Net's per-channel files are picked by the layout
        chain.append(SelectChannelsd(keys="image", channels=channels))
    chain.append(mt.EnsureChannelFirstd(keys=KEYS))
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
