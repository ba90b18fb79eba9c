"""Inference of a trained run, shared by ``evaluate`` and ``predict``.

One volume goes through:
    1. the run's validation/test transforms, image only (load, ``data.modality``'s channels of a 4-D file, channel
       first, ``data.orientation`` / ``data.spacing`` if set, z-score): the model grid;
    2. a MONAI ``SlidingWindowInferer`` (ROI = ``data.roi_size`` = UNETR ``img_size``, gaussian blending,
       ``trainer.sw_batch_size`` windows at a time) per model; windows run on the model device, the whole volume is
       stitched on the CPU (DESIGN §5), so a GPU only ever holds a batch of windows;
    3. softmax, averaged over the models (the paper averages the last 4 epochs' softmax; one model: plain softmax);
    4. the probabilities inverted onto the input file's own voxel grid with MONAI ``Invertd`` (undoes the
       reorientation / resampling of step 1; a no-op when the data config keeps the file's grid), linear
       interpolation of the probabilities, so that the argmax is taken at the file's resolution;
    5. argmax, then removal of connected components smaller than ``min_component_mm3`` using the file's spacing.

Every model is a run's base with its checkpoint's adapter folded in (``merge_adapter``): inference costs the base model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms.utils import allow_missing_keys_mode
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.adapters import merge_adapter
from tcurlora_seg.data.transforms import build_transforms, user_error_of
from tcurlora_seg.engine.postprocess import remove_small_components
from tcurlora_seg.engine.run import epoch_checkpoints, resolve_device, restore_model
from tcurlora_seg.errors import UserError

__all__ = ["DEFAULT_OVERLAP", "Segmenter", "device_for", "select_checkpoints", "voxel_spacing", "write_mask"]

DEFAULT_OVERLAP = 0.5  # final numbers: 0.5 with gaussian blending (validation during training uses less)


def _number(value: Any, key: str, kind: type = float) -> Any:
    """``value`` as ``kind`` (from the command line it may be any string), or a UserError naming ``key``."""
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(float(value))):
            raise ValueError
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{key}={value!r}: expected a number ({kind.__name__})") from None


def device_for(name: str) -> torch.device:
    """The ``device`` key of eval/predict: auto | cpu | cuda | cuda:N."""
    try:
        return resolve_device(str(name))
    except UserError as err:  # resolve_device names trainer.device; here the key is plain `device`
        raise UserError(str(err).replace("trainer.device", "device")) from None


def select_checkpoints(run_dir: str | os.PathLike, checkpoint: str = "best", average_last: int | None = None) -> list[str]:
    """The checkpoint(s) to evaluate: ``[checkpoint]``, or the last ``average_last`` kept ``epoch_NNNN`` files.

    With ``average_last`` > 1, ``checkpoint`` is ignored: the softmax of the last K epochs is averaged (paper: K = 4).
    """
    k = 1 if average_last is None else _number(average_last, "average_last", int)
    if k < 1:
        raise UserError(f"average_last={average_last}: use 1 (the single `checkpoint`) or K > 1 (last K epochs)")
    if k == 1:
        return [str(checkpoint)]
    kept = epoch_checkpoints(run_dir)
    if len(kept) < k:
        raise UserError(
            f"average_last={k}: only {len(kept)} epoch checkpoint(s) in {Path(run_dir) / 'checkpoints'}; "
            f"lower average_last or train with trainer.keep_last_epochs>={k}"
        )
    return [p.stem for p in kept[-k:]]


def voxel_spacing(affine: np.ndarray | torch.Tensor) -> tuple[float, ...]:
    """Voxel size in mm per array axis: the norms of the affine's columns (any rotation or flip)."""
    a = np.asarray(affine, dtype=float)
    return tuple(float(s) for s in np.linalg.norm(a[:3, :3], axis=0))


def write_mask(path: str | os.PathLike, mask: np.ndarray, reference: str | os.PathLike) -> Path:
    """Write a uint8 label map on ``reference``'s grid: its affine and spatial units, our data type."""
    ref = nib.load(os.fspath(reference))
    if tuple(mask.shape) != tuple(ref.shape[:3]):
        raise ValueError(f"mask shape {mask.shape} is not the grid {ref.shape[:3]} of {reference}")
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), ref.affine)
    image.header.set_xyzt_units(*ref.header.get_xyzt_units())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


@dataclass
class Segmenter:
    """The models of a run (merged adapters), their preprocessing and the sliding-window inferer.

    Build it with :meth:`from_run`; :meth:`segment` maps an image file to a label map on the file's grid.
    """

    models: list[torch.nn.Module]
    cfg: DictConfig  # the run's config.yaml
    transform: mt.Compose  # the run's test transforms (image and label keys; used here for the image alone)
    inferer: SlidingWindowInferer
    device: torch.device
    min_component_mm3: float = 0.0
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # {"checkpoint", "epoch", "metric"} per model

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike,
        checkpoints: Sequence[str] = ("best",),
        *,
        overlap: float | None = None,
        min_component_mm3: float | None = None,
        device: str = "auto",
    ) -> Segmenter:
        """Rebuild each checkpoint's model with ``restore_model``, merge its adapter and move it to ``device``."""
        dev = device_for(device)
        overlap = DEFAULT_OVERLAP if overlap is None else _number(overlap, "overlap")
        if not 0.0 <= overlap < 1.0:
            raise UserError(f"overlap={overlap}: the sliding-window overlap must be in [0, 1); the paper's protocol uses 0.5")
        min_mm3 = 0.0 if min_component_mm3 is None else _number(min_component_mm3, "min_component_mm3")
        if min_mm3 < 0:
            raise UserError(f"min_component_mm3={min_mm3}: use 0 (keep everything) or a volume in mm³ (paper: 1000)")
        if not checkpoints:
            raise UserError("no checkpoint selected; set checkpoint=best|last|epoch_NNNN")
        models, infos, cfg = [], [], None
        for which in checkpoints:
            model, cfg, payload = restore_model(run_dir, which)
            merge_adapter(model)  # fold ΔW into the weights once: the adapted model costs the base model
            models.append(model.to(dev).eval())
            infos.append({"checkpoint": which, "epoch": payload.get("epoch"), "metric": payload.get("metric")})
        inferer = SlidingWindowInferer(
            roi_size=[int(s) for s in cfg.data.roi_size],
            sw_batch_size=int(OmegaConf.select(cfg, "trainer.sw_batch_size", default=4)),
            overlap=overlap,
            mode="gaussian",
            sw_device=dev,  # windows on the model's device ...
            device=torch.device("cpu"),  # ... the whole volume stitched in host memory
        )
        transform = build_transforms(OmegaConf.to_container(cfg.data, resolve=True), "test")
        return cls(models, cfg, transform, inferer, dev, min_mm3, infos)

    @property
    def num_classes(self) -> int:
        return int(self.cfg.model.out_channels)

    def preprocess(self, image: str | os.PathLike | Sequence[str]) -> MetaTensor:
        """The run's test transforms applied to the image alone: (C_in, D', H', W') on the model grid, with metadata."""
        try:
            with allow_missing_keys_mode(self.transform):  # the chain also maps "label"; here there is none
                data = self.transform({"image": image})["image"]
        except RuntimeError as err:  # MONAI wraps what a transform raises: a file data.modality does not fit
            cause = user_error_of(err)
            if cause is None:
                raise
            raise cause from None
        expected = int(self.cfg.model.in_channels)
        if data.shape[0] != expected:
            raise UserError(f"{image}: {data.shape[0]} image channel(s), but the run's model.in_channels is {expected}")
        return data

    @torch.no_grad()
    def probabilities(self, image: MetaTensor) -> MetaTensor:
        """Softmax (classes, D', H', W') on the model grid, averaged over the models, on the CPU; keeps ``image``'s metadata."""
        batch = image.as_tensor()[None].float()  # (1, C_in, D', H', W')
        # one model's output at a time: (1, classes, D', H', W') logits on the CPU -> (classes, D', H', W')
        total = sum(torch.softmax(self.inferer(batch, model).float(), dim=1)[0] for model in self.models)
        mean = total / len(self.models)
        # the image's applied_operations are what Invertd undoes to get back to the file's grid
        return MetaTensor(mean, meta=dict(image.meta), applied_operations=list(image.applied_operations))

    def to_input_grid(self, prob: MetaTensor, image: MetaTensor) -> torch.Tensor:
        """Probabilities on the model grid -> the input file's grid (inverse of orientation / spacing; linear)."""
        if not image.applied_operations:
            return prob.as_tensor()
        inverter = mt.Invertd(keys="pred", transform=self.transform, orig_keys="image", nearest_interp=False)
        return inverter({"pred": prob, "image": image})["pred"].as_tensor()

    def postprocess(self, prob: torch.Tensor, spacing: Sequence[float]) -> np.ndarray:
        """argmax of (classes, D, H, W) probabilities, then small-component removal: a uint8 (D, H, W) label map."""
        mask = prob.argmax(dim=0).numpy().astype(np.uint8)
        if self.min_component_mm3 > 0:
            mask = remove_small_components(mask, spacing, self.min_component_mm3)
        return mask

    def segment(self, image: str | os.PathLike | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Label map (D, H, W) uint8 of an image file (or channel files) on its own grid, and that grid's affine."""
        first = image if isinstance(image, (str, os.PathLike)) else image[0]
        affine = nib.load(os.fspath(first)).affine
        data = self.preprocess(image)
        prob = self.to_input_grid(self.probabilities(data), data)
        return self.postprocess(prob, voxel_spacing(affine)), affine
