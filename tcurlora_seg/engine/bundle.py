"""A fine-tuned run as a MONAI Bundle: the merged network, runnable with MONAI alone (no tcurlora_seg, no adapters).

    DIR/configs/metadata.json    the spec's keys; network_data_format says what goes in and comes out
    DIR/configs/inference.json   network_def (a plain MONAI UNETR or SwinUNETR), the run's own preprocessing (its
                                 test transforms, image only), sliding-window inferer, softmax, Invertd back onto each
                                 input's grid, argmax, SaveImaged: DIR-independent ids input_dir / output_dir
    DIR/models/model.pt          the merged state dict (ΔW folded in), a plain tensor dict
    DIR/docs/README.md           data, training and metrics of the run
    DIR/LICENSE

    python -m monai.bundle run --config_file DIR/configs/inference.json --meta_file DIR/configs/metadata.json \\
        --bundle_root DIR --input_dir IMAGES --output_dir MASKS

gives the masks of ``python -m tcurlora_seg.predict run_dir=RUN input=IMAGES output=MASKS`` (same checkpoint,
overlap, gaussian blending, no component removal: predict's defaults), named ``<input stem>_seg.nii.gz``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.adapters import merged_state_dict
from tcurlora_seg.data.transforms import channel_indices
from tcurlora_seg.engine.inference import DEFAULT_OVERLAP
from tcurlora_seg.engine.run import load_run_config, restore_model
from tcurlora_seg.errors import UserError
from tcurlora_seg.atomic import atomic_write
from tcurlora_seg.models import architecture

__all__ = ["export_bundle", "inference_config", "metadata", "network_def", "preprocessing"]

# labels of the axes for Orientationd, given explicitly as build_transforms does (MONAI changes the default)
_AXIS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]


def network_def(cfg: DictConfig) -> dict[str, Any]:
    """The run's network as a bundle component: MONAI's class (UNETR or SwinUNETR) with the run's architecture keys."""
    backbone, target, arch = architecture(OmegaConf.to_container(cfg.model, resolve=True))
    if backbone == "unetr":  # UNETR's input size is part of the network; Swin UNETR takes any multiple of 32
        arch["img_size"] = [int(s) for s in cfg.data.roi_size]
    return {"_target_": target, **arch}


def _pick_channels(channels: list[int]) -> str:
    """``SelectChannelsd`` in MONAI alone, after ``EnsureChannelFirstd``: ``channels`` of an image read from a 4-D file
    (the reader's ``original_channel_dim`` -1), marked as a 3-D file's image is (no channel axis in the file); a 3-D
    file passes unchanged. The mark matters to MONAI 1.6's ``SaveImaged``, which takes one spatial dimension off a
    channel-last mask whose source had channels: its affine comes out 3 x 3 and the save fails."""
    return (f"$lambda x: monai.data.MetaTensor(x[{channels}], meta={{**x.meta, 'original_channel_dim': float('nan')}}, "
            "applied_operations=list(x.applied_operations)) if x.meta.get('original_channel_dim') == -1 else x")


def preprocessing(cfg_data: dict[str, Any]) -> dict[str, Any]:
    """``data.transforms.build_transforms(cfg_data, "test")`` for the image key, as bundle components.

    It must stay the same chain: the export test compares the bundle's masks with predict's, voxel for voxel."""
    chain: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    channels = channel_indices(cfg_data)
    if channels is not None:
        chain.append({"_target_": "Lambdad", "keys": "image", "func": _pick_channels(channels)})
    if cfg_data.get("orientation"):
        chain.append({"_target_": "Orientationd", "keys": "image", "axcodes": str(cfg_data["orientation"]),
                      "labels": _AXIS_LABELS})
    if cfg_data.get("spacing"):
        chain.append({"_target_": "Spacingd", "keys": "image", "pixdim": [float(s) for s in cfg_data["spacing"]],
                      "mode": "bilinear"})
    chain.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True})
    return {"_target_": "Compose", "transforms": chain}


def inference_config(cfg: DictConfig, overlap: float) -> dict[str, Any]:
    """``configs/inference.json``: MONAI's standard inference workflow (SupervisedEvaluator over a folder)."""
    resampled = bool(cfg.data.get("orientation") or cfg.data.get("spacing"))
    # back onto the input's grid, linear on the probabilities (as predict); nothing to undo without resampling
    invert = [{"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
               "nearest_interp": False, "to_tensor": True}] if resampled else []
    return {
        "imports": ["$import glob", "$import os", "$import monai", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "input_dir": "$@bundle_root + '/sample'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(cfg),
        "network": "$@network_def.to(@device)",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@input_dir, '*.nii*')))]",
        "preprocessing": preprocessing(OmegaConf.to_container(cfg.data, resolve=True)),
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        # windows on the device, the whole volume stitched in host memory (as tcurlora_seg.predict)
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [int(s) for s in cfg.data.roi_size],
                    "sw_batch_size": int(OmegaConf.select(cfg, "trainer.sw_batch_size", default=4)),
                    "overlap": float(overlap), "mode": "gaussian", "sw_device": "@device",
                    "device": "$torch.device('cpu')"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            *invert,
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
             "squeeze_end_dims": True, "print_log": False},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _versions() -> dict[str, str]:
    import nibabel

    return {"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__, "required_packages_version": {"nibabel": nibabel.__version__}}


def metadata(cfg: DictConfig, run_dir: Path, *, version: str, authors: str, copyright: str) -> dict[str, Any]:
    """``configs/metadata.json`` with the spec's mandatory keys."""
    from tcurlora_seg import __version__

    roi = [int(s) for s in cfg.data.roi_size]
    classes = int(cfg.model.out_channels)
    names = {str(i): ("background" if i == 0 else f"label {i}") for i in range(classes)}
    network = network_def(cfg)["_target_"].rsplit(".", 1)[1]  # UNETR or SwinUNETR
    task = f"{run_dir.name}: {cfg.peft.name} fine-tuned {network}, {classes - 1}-class MRI segmentation"
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": version,
        "changelog": {version: f"exported by tcurlora_seg {__version__} from {run_dir.name}"},
        **_versions(),
        "name": f"tcurlora_seg {run_dir.name}",
        "task": task,
        "description": (f"A MONAI {network} fine-tuned with {cfg.peft.name} by tcurlora_seg, the adapter merged into the "
                        "weights: a plain network. Input: one NIfTI scan per file; output: its label map on the "
                        "scan's own grid."),
        "authors": authors,
        "copyright": copyright,
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR", "num_channels": int(cfg.model.in_channels),
                "spatial_shape": roi, "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(c): "MRI, z-scored over the non-zero voxels" for c in range(int(cfg.model.in_channels))},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": classes, "spatial_shape": roi,
                "dtype": "float32", "value_range": [], "is_patch_data": True, "channel_def": names,
            }},
        },
    }


def _readme(cfg: DictConfig, run_dir: Path, checkpoint: str, overlap: float) -> str:
    """``docs/README.md``: what the network was trained on and how, and what it scored (eval/summary.json)."""
    summary_path = run_dir / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    stats_path = run_dir / "train_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    mean = summary.get("foreground_mean", {})
    scores = (f"Test split ({summary.get('evaluation', {}).get('n_cases', '?')} cases): Dice {mean['Dice']:.2f} %, "
              f"HD95 {mean['HD95']:.2f} mm (foreground mean, `eval/summary.json` of the run)." if mean
              else "The run was not evaluated (no `eval/summary.json`): run `make eval RUN=...` before exporting.")
    best = stats.get("best_val_dice")
    network = network_def(cfg)["_target_"]
    return "\n".join([
        f"# {run_dir.name}", "",
        f"A MONAI {network.rsplit('.', 1)[1]} fine-tuned with **{cfg.peft.name}** by tcurlora_seg; the adapter is merged "
        f"into the weights, so this is a plain `{network}`.", "",
        "## Data", "",
        f"`data.root`: `{cfg.data.get('root')}`; crops of {list(cfg.data.roi_size)} voxels, z-score over the non-zero "
        f"voxels{', reoriented to ' + str(cfg.data.orientation) if cfg.data.get('orientation') else ''}"
        f"{', resampled to ' + str(list(cfg.data.spacing)) + ' mm' if cfg.data.get('spacing') else ''}.", "",
        "## Training", "",
        f"Method `{cfg.peft.name}`, seed {cfg.seed}, {cfg.trainer.max_epochs} epochs x {cfg.trainer.get('epoch_length')} "
        f"steps, lr {cfg.optim.lr} (decoder), adapter lr {cfg.optim.get('adapter_lr') or cfg.optim.lr}; source model "
        f"`{cfg.model.get('pretrained')}`" + (f"; best validation Dice {best:.2f} %." if best is not None else "."), "",
        "## Metrics", "", scores, "",
        "## Inference", "",
        f"Checkpoint `{checkpoint}`, sliding window of {list(cfg.data.roi_size)} with overlap {overlap} and gaussian "
        "blending, softmax, back onto the input's grid, argmax; no component removal.", "",
        "```",
        "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
        "    --bundle_root . --input_dir IMAGES --output_dir MASKS",
        "```", "",
    ])


def export_bundle(run_dir: str | os.PathLike, out: str | os.PathLike, *, checkpoint: str = "best",
                  overlap: float | None = None, version: str = "0.1.0", authors: str = "unknown",
                  copyright: str = "unknown", license: str = "") -> Path:
    """Write the Bundle of ``run_dir``'s fine-tuned model (``checkpoint``: as for predict) into ``out``; returns it."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_run_config(run_dir)
    overlap = DEFAULT_OVERLAP if overlap is None else float(overlap)
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"overlap={overlap}: the sliding-window overlap must be in [0, 1); predict's default is 0.5")
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise UserError(f"out={out}: is the run folder or holds it; choose a new folder for the bundle")
    model, cfg, _ = restore_model(run_dir, checkpoint)
    state = merged_state_dict(model)
    fix = "choose another out=, then export again"
    atomic_write(out / "models" / "model.pt", lambda f: torch.save(state, f), what="bundle file", fix=fix)
    meta = metadata(cfg, run_dir, version=version, authors=authors, copyright=copyright)
    files = {
        out / "configs" / "metadata.json": json.dumps(meta, indent=2) + "\n",
        out / "configs" / "inference.json": json.dumps(inference_config(cfg, overlap), indent=2) + "\n",
        out / "docs" / "README.md": _readme(cfg, run_dir, checkpoint, overlap),
        out / "LICENSE": license or ("The configs of this bundle follow MONAI's (Apache-2.0). The weights derive from "
                                     "the source model and the training data: their licenses apply; set license= when "
                                     "exporting to state them.\n"),
    }
    for path, text in files.items():
        atomic_write(path, lambda f, text=text: f.write(text.encode()), what="bundle file", fix=fix)
    print(f"bundle written to {out}\n  python -m monai.bundle run --config_file {out}/configs/inference.json "
          f"--meta_file {out}/configs/metadata.json --bundle_root {out} --input_dir IMAGES --output_dir MASKS",
          file=sys.stdout)
    return out
