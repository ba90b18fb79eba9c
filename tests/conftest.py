from __future__ import annotations

import os

import pytest
import torch
from monai.networks.nets import UNETR

# The tiny UNETR of the test suite (DESIGN: hidden 48, 3 heads, mlp 96, feature size 8, 32³); 12 blocks as always.
TINY = dict(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=3)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test``: one worker per core) each worker and the runs it starts get cores / workers
    threads: two 2-thread torch processes on 2 cores spin-wait on each other 10-100x slower than one thread each."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        # the cores this process may use, as `nproc` (the Makefile's worker count) counts them: os.cpu_count() is the
        # host's in a container pinned to fewer, which would give each worker far too many threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // int(workers))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def make_tiny_unetr(seed: int = 0, **overrides) -> UNETR:
    """A deterministic tiny UNETR standing in for a pretrained source model."""
    torch.manual_seed(seed)
    return UNETR(**{**TINY, **overrides})


@pytest.fixture
def tiny_unetr() -> UNETR:
    return make_tiny_unetr()


@pytest.fixture
def volume() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, 32, 32, 32)


def write_official_dataset(root, n: int = 6, shape=(40, 36, 32), spacing=(1.5, 1.5, 2.0)):
    """A learnable toy cohort in the official layout: a bright box (label 1) in noise; sub1-3 train, sub4 val, rest test."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    affine = np.diag([*spacing, 1.0])
    for i in range(1, n + 1):
        label = np.zeros(shape, np.uint8)
        x0, y0, z0 = rng.integers(6, 16, size=3)
        label[x0 : x0 + 10, y0 : y0 + 9, z0 : z0 + 8] = 1
        image = (rng.normal(0.0, 0.3, shape) + 1.0 + 2.0 * label).astype(np.float32)
        case = root / f"sub{i}"
        case.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), case / f"sub{i}_img.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), case / f"sub{i}_mask.nii.gz")
    (root / "train.txt").write_text("sub1\nsub2\nsub3\n")
    (root / "valid.txt").write_text("sub4\n")
    (root / "test.txt").write_text("".join(f"sub{i}\n" for i in range(5, n + 1)))
    return root


@pytest.fixture
def official_dataset(tmp_path):
    return write_official_dataset(tmp_path / "toy")
