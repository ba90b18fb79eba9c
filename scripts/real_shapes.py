"""Fixtures shaped like the datasets users really have: the layouts, file names, grids, affines, dtypes, channel
layout and label values of BraTS 2021, EADC-ADNI, LPBA40, UPENN-GBM and the Medical Segmentation Decathlon's Task04
(hippocampus) and Task01 (brain tumour), filled with a synthetic anatomy that a model can learn. Nothing is downloaded.

    python scripts/real_shapes.py OUT                          # every dataset, 4 cases each, real sizes, into OUT/<name>
    python scripts/real_shapes.py OUT --datasets brats msd_brain_tumour --cases 3 --scale 0.25   # smaller grids

Keys are the recipes (``configs/experiment/<name>.yaml``), each with its data config (``configs/data/``):

| key | layout | files | grid | affine | labels |
|---|---|---|---|---|---|
| brats | brats2021 | BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz, int16 images | 240x240x155 | diag(-1, -1, 1), origin (0, 239, 0) | 0/1/2/4 |
| eadc | official | sub{i}/sub{i}_img.nii.gz + _mask | 182x218x182 | MNI152 1 mm | 0/1/2 (left/right) |
| lpba40 | official | as eadc | 182x218x182 | MNI152 1 mm | the 56 of configs/data/lpba40.yaml |
| upenn_gbm | official | as eadc (T1GD) | 240x240x155 | as brats | 0/1/2/4 |
| msd_hippocampus | decathlon | dataset.json, imagesTr/hippocampus_NNN.nii.gz | about 35x50x35, per case | 1 mm | 0/1/2 |
| msd_brain_tumour | decathlon | dataset.json, imagesTr/BRATS_NNN.nii.gz, 4-D | 240x240x155x4 | 1 mm | 0/1/2/3 |

The anatomy: a skull-stripped head (an ellipsoid brain, zero outside, a smooth tissue field and noise; MSD's
hippocampus crops are not skull-stripped and are positive everywhere), a tumour (necrotic core, enhancing rim,
oedema, with each modality's own contrast: the rim bright in T1ce, the oedema bright in FLAIR and T2), or hippocampi
brighter than the tissue around them at the MNI152 positions of the real ones. Intensities are integer-valued (as
scanners write them), which also keeps the gzip files small. ``scale`` < 1 shrinks every grid (and what lies in it)
for quick runs; the affines keep 1 mm voxels and their axis directions.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]

BRATS_SHAPE = (240, 240, 155)
MNI_SHAPE = (182, 218, 182)
# MNI152 1 mm (FSL's MNI152_T1_1mm): voxel (i, j, k) -> (-i + 90, j - 126, k - 72) mm
MNI_AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
MSD_MODALITIES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}  # Task01's dataset.json "modality"
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
# tumour regions (0 outside) -> label value: BraTS / UPENN-GBM (NCR 1, ED 2, ET 4) and MSD Task01 (1 oedema,
# 2 non-enhancing tumour, 3 enhancing tumour)
CORE, RIM, OEDEMA = 1, 2, 3
BRATS_CODES = {CORE: 1, OEDEMA: 2, RIM: 4}
MSD_CODES = {OEDEMA: 1, CORE: 2, RIM: 3}
# intensity of each region relative to the tissue, per modality (T1ce: bright rim, dark core; FLAIR/T2: bright oedema)
CONTRAST = {
    "t1": {CORE: 0.6, RIM: 0.9, OEDEMA: 0.75},
    "t1ce": {CORE: 0.45, RIM: 2.0, OEDEMA: 0.7},
    "t2": {CORE: 1.9, RIM: 1.3, OEDEMA: 1.6},
    "flair": {CORE: 0.9, RIM: 1.5, OEDEMA: 1.8},
}
# the hippocampi in MNI152 mm (left x < 0), their half-axes in mm
HIPPOCAMPI_MM = {"left": (-28.0, -22.0, -14.0), "right": (28.0, -22.0, -14.0)}
HIPPOCAMPUS_RADII_MM = (7.0, 17.0, 9.0)


def scaled(shape: Sequence[int], scale: float) -> tuple[int, ...]:
    """``shape`` times ``scale``, each axis at least 16 voxels (a UNETR patch)."""
    return tuple(max(16, int(round(n * scale))) for n in shape)


def brats_affine(shape: Sequence[int]) -> np.ndarray:
    """BraTS' header: 1 mm, the first two axes flipped (LPS-like), origin at (0, Y - 1, 0)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine


def mni_affine(scale: float) -> np.ndarray:
    """MNI152 1 mm; on a scaled grid the origin shrinks with it, so the grid's centre stays where MNI's is."""
    affine = MNI_AFFINE.copy()
    affine[:3, 3] *= scale
    return affine


def ellipsoid(shape: Sequence[int], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised distance from ``centre`` (voxels) on ``shape``: < 1 inside the ellipsoid of half-axes ``radii``."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)))


def smooth_field(shape: Sequence[int], rng: np.random.Generator, amplitude: float, knots: int = 6) -> np.ndarray:
    """A smooth random field, mean 0, about ``amplitude`` in size: knots upsampled linearly (tissue texture, bias)."""
    coarse = rng.standard_normal((knots,) * len(shape))
    return amplitude * ndimage.zoom(coarse, [n / knots for n in shape], order=1, mode="nearest")[tuple(slice(0, n) for n in shape)]


def head(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A skull-stripped brain: (mask, tissue intensity about 1 inside, 0 outside)."""
    centre = [n / 2 + rng.uniform(-0.02, 0.02) * n for n in shape]
    radii = [0.42 * n * rng.uniform(0.95, 1.05) for n in shape]
    brain = ellipsoid(shape, centre, radii) < 1
    tissue = (1.0 + smooth_field(shape, rng, 0.08)) * brain
    return brain, tissue


def tumour(shape: Sequence[int], brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Regions (CORE, RIM, OEDEMA; 0 elsewhere) of one tumour inside the brain."""
    centre = [rng.uniform(0.38, 0.62) * n for n in shape]
    radius = rng.uniform(0.09, 0.13) * min(shape[:2])
    distance = ellipsoid(shape, centre, [radius * rng.uniform(0.85, 1.15) for _ in shape])
    regions = np.select([distance < 0.35, distance < 0.6, distance < 1.0], [CORE, RIM, OEDEMA], 0).astype(np.uint8)
    return regions * brain


def mri(tissue: np.ndarray, regions: np.ndarray, contrast: dict[int, float], rng: np.random.Generator,
        gain: float = 600.0) -> np.ndarray:
    """One modality: the tissue with each region's contrast, noise inside the brain, integer values."""
    image = tissue.astype(np.float32) * np.float32(gain)  # float32 throughout: a 240x240x155 volume is 36 MB
    for region, value in contrast.items():
        image[regions == region] *= value
    image *= 1.0 + 0.04 * rng.standard_normal(tissue.shape, dtype=np.float32)
    image[tissue <= 0] = 0
    return np.rint(image)


def hippocampi(shape: Sequence[int], affine: np.ndarray, scale: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Masks of the left and right hippocampus at their MNI152 positions (``affine`` maps voxels to mm)."""
    to_voxel = np.linalg.inv(affine)
    masks = {}
    for side, mm in HIPPOCAMPI_MM.items():
        centre = (to_voxel @ np.array([*(c * scale for c in mm), 1.0]))[:3] + rng.uniform(-2, 2, 3) * scale
        radii = [max(2.0, r * scale * rng.uniform(0.9, 1.1)) for r in HIPPOCAMPUS_RADII_MM]
        masks[side] = ellipsoid(shape, centre, radii) < 1
    return masks


def save(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


def lpba40_labels() -> list[int]:
    """The 56 structure codes (and 0) that configs/data/lpba40.yaml declares: the fixture holds exactly those."""
    return [int(v) for v in OmegaConf.load(REPO / "configs" / "data" / "lpba40.yaml").labels]


# --- one writer per dataset: (root, case index, rng, scale) -> files of that case --------------------------------


def _brats_case(root: Path, index: int, rng: np.random.Generator, scale: float) -> None:
    shape = scaled(BRATS_SHAPE, scale)
    affine = brats_affine(shape)
    case = f"BraTS2021_{2 * index:05d}"
    brain, tissue = head(shape, rng)
    regions = tumour(shape, brain, rng)
    for modality in BRATS_MODALITIES:
        save(root / case / f"{case}_{modality}.nii.gz", mri(tissue, regions, CONTRAST[modality], rng), affine, np.int16)
    save(root / case / f"{case}_seg.nii.gz", _codes(regions, BRATS_CODES), affine, np.uint8)


def _codes(regions: np.ndarray, codes: dict[int, int]) -> np.ndarray:
    label = np.zeros(regions.shape, np.uint8)
    for region, code in codes.items():
        label[regions == region] = code
    return label


def _upenn_case(root: Path, index: int, rng: np.random.Generator, scale: float) -> None:
    shape = scaled(BRATS_SHAPE, scale)
    affine = brats_affine(shape)  # SRI24 as BraTS
    brain, tissue = head(shape, rng)
    regions = tumour(shape, brain, rng)
    case = f"sub{index + 1}"
    save(root / case / f"{case}_img.nii.gz", mri(tissue, regions, CONTRAST["t1ce"], rng), affine, np.float32)
    save(root / case / f"{case}_mask.nii.gz", _codes(regions, BRATS_CODES), affine, np.uint8)


def _mni_case(root: Path, index: int, rng: np.random.Generator, scale: float, parcels: bool) -> None:
    """EADC-ADNI (left 1, right 2) or, with ``parcels``, LPBA40 (56 structures, hippocampi 165 / 166)."""
    shape = scaled(MNI_SHAPE, scale)
    affine = mni_affine(scale)
    brain, tissue = head(shape, rng)
    label = np.zeros(shape, np.uint8)
    if parcels:  # the other 54 structures: blocks of the brain, each its own code and a slightly different grey
        others = [v for v in lpba40_labels() if v not in (0, 165, 166)]
        cuts = [np.sort(rng.uniform(0.3, 0.7, 3)) * n for n in shape]
        block = sum(np.digitize(np.arange(n), cut).reshape([-1 if a == axis else 1 for a in range(3)]) * 4 ** axis
                    for axis, (n, cut) in enumerate(zip(shape, cuts)))  # 4 x 4 x 4 = 64 blocks
        codes = np.array(others)[block % len(others)]
        label[brain] = codes[brain]
        greys = {code: rng.uniform(0.85, 1.1) for code in others}
        for code, grey in greys.items():
            tissue[label == code] *= grey
    for side, mask in hippocampi(shape, affine, scale, rng).items():
        mask &= brain
        label[mask] = (165 if side == "left" else 166) if parcels else (1 if side == "left" else 2)
        tissue[mask] = 1.35 * (1.0 + 0.02 * rng.standard_normal(int(mask.sum())))
    case = f"sub{index + 1}"
    save(root / case / f"{case}_img.nii.gz", mri(tissue, np.zeros(shape, np.uint8), {}, rng), affine, np.float32)
    save(root / case / f"{case}_mask.nii.gz", label, affine, np.uint8)


def _msd_hippocampus_case(root: Path, index: int, rng: np.random.Generator, scale: float) -> dict[str, str]:
    """A crop around one hippocampus, about 35x50x35, positive everywhere; anterior 1, posterior 2 along axis 1."""
    shape = scaled((int(rng.integers(33, 38)), int(rng.integers(48, 54)), int(rng.integers(33, 38))), scale)
    tissue = 0.8 + smooth_field(shape, rng, 0.06, knots=4)
    centre = [n / 2 + rng.uniform(-0.05, 0.05) * n for n in shape]
    distance = ellipsoid(shape, centre, [0.22 * shape[0], 0.36 * shape[1], 0.2 * shape[2]])
    csf = ellipsoid(shape, [centre[0] + 0.25 * shape[0], centre[1], centre[2]], [0.08 * shape[0], 0.3 * shape[1], 0.1 * shape[2]]) < 1
    inside = distance < 1
    tissue[csf & ~inside] = 0.3
    tissue[inside] = 1.3
    label = np.zeros(shape, np.uint8)
    anterior = (np.arange(shape[1]) < centre[1]).reshape(1, -1, 1)
    label[inside & anterior] = 1
    label[inside & ~anterior] = 2
    image = np.rint(400 * tissue * (1.0 + 0.04 * rng.standard_normal(shape)))
    name = f"hippocampus_{2 * index + 1:03d}.nii.gz"
    save(root / "imagesTr" / name, np.maximum(image, 1), np.eye(4), np.float32)
    save(root / "labelsTr" / name, label, np.eye(4), np.uint8)
    return {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}


def _msd_brain_tumour_case(root: Path, index: int, rng: np.random.Generator, scale: float) -> dict[str, str]:
    """One 4-D file (X, Y, Z, 4): FLAIR, T1w, T1gd, T2w in the 4th axis (dataset.json "modality"); 3-D labels 0-3."""
    shape = scaled(BRATS_SHAPE, scale)
    brain, tissue = head(shape, rng)
    regions = tumour(shape, brain, rng)
    channels = [mri(tissue, regions, CONTRAST[m], rng) for m in ("flair", "t1", "t1ce", "t2")]
    name = f"BRATS_{index + 1:03d}.nii.gz"
    save(root / "imagesTr" / name, np.stack(channels, axis=-1), np.eye(4), np.float32)
    save(root / "labelsTr" / name, _codes(regions, MSD_CODES), np.eye(4), np.uint8)
    return {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}


def _dataset_json(root: Path, training: list[dict[str, str]], **meta) -> None:
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(training), "numTest": 0,
                                                   "training": training, "test": []}, indent=2) + "\n")


@dataclass(frozen=True)
class Spec:
    """One dataset: its recipe (``configs/experiment/<key>.yaml``), data config and how a case is written."""

    data: str  # configs/data/<data>.yaml
    layout: str
    write_case: Callable[..., dict[str, str] | None]
    dataset_json: dict | None = None  # MSD: dataset.json without the training list

    def write(self, root: Path, cases: int = 4, seed: int = 0, scale: float = 1.0) -> Path:
        """``cases`` cases into ``root`` (created); every case draws from its own generator (seed, case)."""
        root.mkdir(parents=True, exist_ok=True)
        items = [self.write_case(root, i, np.random.default_rng([seed, i]), scale) for i in range(cases)]
        if self.dataset_json is not None:
            _dataset_json(root, items, **self.dataset_json)
        return root


SPECS: dict[str, Spec] = {
    "brats": Spec("brats", "brats2021", _brats_case),
    "eadc": Spec("eadc", "official", lambda root, i, rng, scale: _mni_case(root, i, rng, scale, parcels=False)),
    "lpba40": Spec("lpba40", "official", lambda root, i, rng, scale: _mni_case(root, i, rng, scale, parcels=True)),
    "upenn_gbm": Spec("upenn_gbm", "official", _upenn_case),
    "msd_hippocampus": Spec("msd_hippocampus", "decathlon", _msd_hippocampus_case, {
        "name": "Hippocampus", "description": "Left and right hippocampus segmentation", "tensorImageSize": "3D",
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}}),
    "msd_brain_tumour": Spec("msd_brain_tumour", "decathlon", _msd_brain_tumour_case, {
        "name": "BRATS", "description": "Gliomas segmentation tumour and oedema in on brain images",
        "tensorImageSize": "4D", "modality": MSD_MODALITIES,
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}),
}


def write_dataset(name: str, root: str | Path, cases: int = 4, seed: int = 0, scale: float = 1.0) -> Path:
    """Write dataset ``name`` (a key of SPECS) into ``root``; returns ``root``."""
    if name not in SPECS:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(SPECS)}")
    return SPECS[name].write(Path(root), cases, seed, scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder: one subfolder per dataset")
    parser.add_argument("--datasets", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every grid by this factor (quick runs)")
    args = parser.parse_args()
    for name in args.datasets:
        print(write_dataset(name, args.out / name, args.cases, args.seed, args.scale))


if __name__ == "__main__":
    main()
