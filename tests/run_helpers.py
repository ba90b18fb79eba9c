"""Helpers for evaluation / prediction tests: a tiny dataset in the official layout and a fabricated run folder.

The run folder is written exactly as ``engine/run.py`` documents (config.yaml + checkpoints/{best,epoch_NNNN}.pt in
FORMAT), from the real configs composed with Hydra, with the tiny UNETR at 32³ and random (non-zero) adapter weights.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tcurlora_seg.adapters import adapter_state_dict
from tcurlora_seg.engine.run import FORMAT, build_model, save_run_config
from tcurlora_seg.models import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# 2 mm voxels, axes flipped and permuted, an offset: a grid on which mixing up voxel order or affine shows
AFFINE = np.array([[-2.0, 0, 0, 40], [0, 0, 2.0, -30], [0, 2.0, 0, -20], [0, 0, 0, 1]])
SHAPE = (36, 24, 20)  # larger than the 32³ window on one axis: more than one window


def load_script(name: str) -> ModuleType:
    """A script of scripts/ as a module (scripts/ is not a package), to test its functions directly."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def terminal_sigint() -> None:
    """Popen preexec_fn: SIGINT's default action, as at a terminal. A suite started in the background of a shell
    without job control (nohup make test &) hands its children SIGINT ignored, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_thread() -> Iterator[None]:
    """Use as a fixture body: the tiny model runs 2-3x faster on one thread on a small shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_scan(path: Path, seed: int, shape: Sequence[int] = SHAPE, affine: np.ndarray = AFFINE) -> tuple[Path, Path]:
    """An image (noise inside a box) and its label (a block) next to each other: ``<stem>_img`` / ``<stem>_mask``."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, dtype=np.float32)
    image[2:-2, 2:-2, 2:-2] = rng.uniform(1.0, 2.0, size=tuple(s - 4 for s in shape))
    label = np.zeros(shape, dtype=np.uint8)
    label[8:20, 6:14, 5:12] = 1
    image[label == 1] += 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    img_path = path.parent / f"{path.name}_img.nii.gz"
    mask_path = path.parent / f"{path.name}_mask.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), img_path)
    nib.save(nib.Nifti1Image(label, affine), mask_path)
    return img_path, mask_path


def make_dataset(root: Path, lists: dict[str, list[int]]) -> Path:
    """Subjects of ``lists`` in the official layout with train.txt / valid.txt / test.txt."""
    names = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
    for split, ids in lists.items():
        for i in ids:
            write_scan(root / f"sub{i}" / f"sub{i}", seed=i)
        (root / names[split]).write_text("".join(f"sub{i}\n" for i in ids))
    return root


def compose_run_config(data_root: Path, overrides: Sequence[str] = (), data: str = "official",
                       roi_size: Sequence[int] = (32, 32, 32)) -> DictConfig:
    """configs/train.yaml with the tiny model on the official layout (or another ``data`` config)."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "model=unetr_tiny",
                f"data={data}",
                f"data.root={data_root}",
                f"data.roi_size=[{','.join(str(int(s)) for s in roi_size)}]",
                "data.num_workers=0",
                "peft.rank=2",
                "model.pretrained=null",
                "trainer.sw_batch_size=2",
                *overrides,
            ],
        )


def make_run(run_dir: Path, data_root: Path, overrides: Sequence[str] = (), epochs: Sequence[int] = (1, 2),
             data: str = "official", roi_size: Sequence[int] = (32, 32, 32)) -> Path:
    """A run folder: config.yaml, checkpoints/best.pt and one ``epoch_NNNN.pt`` per epoch, each with other weights."""
    cfg = compose_run_config(data_root, overrides, data, roi_size)
    save_run_config(cfg, run_dir)
    model, _ = build_model(cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    names = ["best"] + [f"epoch_{e:04d}" for e in epochs]
    for seed, name in enumerate(names):
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():  # U starts at zero: move it (and the decoder) so that the checkpoints differ
            for p in trained:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        payload = {
            "format": FORMAT,
            "epoch": seed + 1,
            "iteration": seed + 1,
            "metric": None,
            "config": cfg,
            "adapter": adapter_state_dict(model),
        }
        save_checkpoint(run_dir / "checkpoints" / f"{name}.pt", payload)
    return run_dir


def scalars(run: Path, tag: str) -> list[float]:
    """The values a run logged to TensorBoard under ``tag``, in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]
