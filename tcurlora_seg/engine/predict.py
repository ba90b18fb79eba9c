"""Segment new scans with a trained run: NIfTI in, uint8 NIfTI masks on each input's own grid out.

Same inference as evaluation (``engine/inference.py``): the run's validation transforms for the image alone, merged
adapter(s), sliding window, optional softmax averaging, inversion to the input grid, small-component removal.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
from tqdm import tqdm

from tcurlora_seg.engine.inference import Segmenter, select_checkpoints, write_mask
from tcurlora_seg.errors import UserError

__all__ = ["NIFTI_SUFFIXES", "list_inputs", "predict", "output_name"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def output_name(path: Path, suffix: str = "_seg") -> str:
    """``sub1_img.nii.gz`` -> ``sub1_img<suffix>.nii.gz`` (always compressed)."""
    stem = next(path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.endswith(s))
    return f"{stem}{suffix}.nii.gz"


def list_inputs(input: str | os.PathLike, output: str | os.PathLike) -> list[Path]:
    """The NIfTI file(s) of ``input`` (a file or a folder), checked readable; refuses to write into the input's folder."""
    source = Path(input)
    if not source.exists():
        raise UserError(f"input={source}: no such file or folder; give a .nii/.nii.gz file or a folder of them")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and _is_nifti(p))
        if not files:
            raise UserError(f"input={source}: no .nii or .nii.gz files in this folder; give a folder of NIfTI scans")
        folder = source
    else:
        if not _is_nifti(source):
            raise UserError(f"input={source}: not a NIfTI file (.nii or .nii.gz); convert it or give a folder of NIfTI scans")
        files, folder = [source], source.parent
    # a mask next to its scan would be read as a scan by the next run over the folder
    if Path(output).resolve() == folder.resolve():
        raise UserError(f"output={output}: is the input's folder; choose another output folder")
    for path in files:
        try:
            nib.load(path)  # header only: fail before any model is built
        except Exception as err:  # nibabel raises several types for non-NIfTI or corrupt headers
            raise UserError(f"input {path}: cannot be read as NIfTI ({type(err).__name__}); fix or re-export the file") from err
    return files


def predict(
    run_dir: str | os.PathLike,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    checkpoint: str = "best",
    average_last: int | None = None,
    min_component_mm3: float | None = None,
    overlap: float | None = None,
    suffix: str = "_seg",
    device: str = "auto",
    progress: bool = True,
) -> list[Path]:
    """Write ``output/<name><suffix>.nii.gz`` for every scan of ``input``; return the written paths.

    Arguments as :func:`engine.evaluate.evaluate_run`; ``suffix`` "" keeps the input file's name.
    """
    files = list_inputs(input, output)
    names = select_checkpoints(run_dir, checkpoint, average_last)
    segmenter = Segmenter.from_run(run_dir, names, overlap=overlap, min_component_mm3=min_component_mm3, device=device)
    written = []
    for path in tqdm(files, desc="predict", unit="scan", disable=not progress):
        mask, _ = segmenter.segment(str(path))
        written.append(write_mask(Path(output) / output_name(path, suffix), mask, path))
    return written
