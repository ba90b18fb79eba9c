"""Embedded offline demo cohort built from the real MNI152 2009 anatomy that ships inside nilearn.

Four tasks, each written in the official layout (``sub{i}/sub{i}_img.nii.gz``, ``sub{i}_mask.nii.gz``,
``train.txt`` / ``valid.txt`` / ``test.txt``) so that the demo goes through the real loader:

- ``source/``: a BraTS-like lesion task for pretraining (bright, ring-enhancing blobs inserted into the white matter);
- ``ventricles/``: the default target, a different anatomical structure for fine-tuning with 5 training cases (the
  lateral and third ventricles: CSF more than 8 mm inside the brain within an ellipsoid around them), which the
  source model does not segment at all and a fine-tuned one can learn from the image (dark CSF inside white matter);
- ``hippocampus/``: the paper's structure (the hippocampal grey matter, carved from the GM probability map inside two
  ellipsoids around MNI (±28, −22, −14), as in EADC-ADNI / LPBA40); its border within the grey matter is a geometric
  cut, not an edge in the image, so a few hundred steps learn it only in part;
- ``flair/``: a second tumour cohort for fine-tuning with 5 training cases, as the paper's UPENN-GBM: another
  contrast (FLAIR-like: grey matter brighter than white matter, CSF dark) and another label (the tumour core, without
  the wide oedema around it that the source model would also mark), so the source model's features help but its
  masks do not fit.

Every subject is the template under a random smooth deformation (small affine + coarse displacement field), with a
gamma change, a multiplicative bias field and noise inside the brain; the background stays exactly 0 (skull-stripped,
like the paper's data). 2 mm voxels on a 96×112×96 grid (divisible by 16). Deterministic for a seed: each subject
draws from its own generator seeded by (seed, task, index), so the build order does not matter.
See data/README.md for the construction.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from tcurlora_seg.errors import UserError

__all__ = ["DEMO_VERSION", "DEMO_SHAPE", "DEMO_TASKS", "POOL_LIST", "build_demo", "build_pool", "demo_is_built",
           "pool_ids", "with_pool"]

# Bump whenever the generator changes: a cache with another version is rebuilt.
DEMO_VERSION = 2
DEMO_SHAPE = (96, 112, 96)
MANIFEST = "demo.json"
# name -> (task code for seeding, train, val, test). A task added later is built into an existing cache of the same
# version and seed without touching the others (and the source model cached beside them).
DEMO_TASKS: dict[str, tuple[int, int, int, int]] = {
    "source": (1, 16, 4, 0), "necrosis": (5, 5, 3, 10), "ventricles": (4, 5, 3, 10), "hippocampus": (2, 5, 3, 10), "flair": (3, 5, 3, 10)}
# The 2 mm template is 99×117×95 with the brain in x 13..85, y 14..103, z 0..77: crop x and y, pad z at the top.
_CROP = ((1, 97), (3, 115), (0, 95))
_PAD_Z = 1
# Hippocampus centres (MNI mm) and ellipsoid radii (mm) of the region carved from the GM map.
_HIPPO_CENTRES = ((28.0, -22.0, -14.0), (-28.0, -22.0, -14.0))
_HIPPO_RADII = (7.0, 17.0, 9.0)
# Ventricles: CSF (1 - GM - WM > 0.5) deeper than _VENTRICLE_DEPTH_MM inside the brain, within an ellipsoid (MNI mm)
# that holds the lateral and third ventricles and none of the sulcal CSF or the basal cisterns.
_VENTRICLE_CENTRE = (0.0, -8.0, 12.0)
_VENTRICLE_RADII = (28.0, 42.0, 22.0)
_VENTRICLE_DEPTH_MM = 8.0
# FLAIR tumours: the oedema reaches this many core radii from the centre
_OEDEMA_REACH = 2.1


def _nilearn_data_dir() -> Path:
    """nilearn's package data folder, found without importing nilearn (its import costs seconds)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo needs nilearn's MNI152 templates: install nilearn (pip install nilearn) or use a real data=...")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def _downsample(vol: np.ndarray) -> np.ndarray:
    """1 mm -> 2 mm on the grid that nilearn's ``resolution=2`` uses (every other voxel), after a [1, 2, 1]/4 blur."""
    out = torch.from_numpy(vol)[None, None]
    kernel = torch.tensor([0.25, 0.5, 0.25])
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 3
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 1
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0, ::2, ::2, ::2].numpy()


@functools.lru_cache(maxsize=1)  # seconds of gzip reading; the maps are only read afterwards, never written
def _load_atlas() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM and WM maps of MNI152 2009a (in [0, 1]) at 2 mm on the demo grid, and the grid's affine.

    The 1 mm files (197×233×189, uint8) are read from nilearn's package data: no network is involved.
    """
    folder = _nilearn_data_dir()
    (x0, x1), (y0, y1), (z0, z1) = _CROP
    maps = []
    for name in ("t1", "gm", "wm"):
        path = folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.is_file():
            raise UserError(f"{path}: missing from the nilearn package; reinstall nilearn (pip install --force-reinstall nilearn)")
        img = nib.load(path)
        vol = _downsample(np.asarray(img.dataobj, dtype=np.float32) / 255.0)[x0:x1, y0:y1, z0:z1]
        maps.append(np.pad(vol, ((0, 0), (0, 0), (0, _PAD_Z))))
    affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm, same origin (voxel 0 is kept)
    affine[:3, 3] += affine[:3, :3] @ np.array([x0, y0, z0], dtype=float)
    t1, gm, wm = maps
    t1[t1 < 1e-3] = 0.0
    for vol in (t1, gm, wm):
        vol.flags.writeable = False  # shared by the cache
    return t1, gm, wm, affine


def _hippocampal_region(gm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Float mask (0/1) of the GM inside two ellipsoids around the hippocampi, in template space."""
    xyz = _mni_coordinates(gm.shape, affine)
    inside = np.zeros(gm.shape, dtype=bool)
    for centre in _HIPPO_CENTRES:
        inside |= _in_ellipsoid(xyz, centre, _HIPPO_RADII)
    return (inside & (gm > 0.45)).astype(np.float32)


def _mni_coordinates(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """(3, X, Y, Z) MNI coordinates in mm of every voxel of the template grid."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)


def _in_ellipsoid(xyz: np.ndarray, centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    return sum(((xyz[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0


def _ventricles(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Float mask (0/1) of the lateral and third ventricles in template space (about 2,000 voxels at 2 mm).

    nilearn ships no CSF map: CSF = 1 - GM - WM inside the brain. The ventricles are the CSF deep inside the brain
    (the sulcal CSF lies within a few mm of its surface) in a box around the midline; specks under 100 voxels
    (partial-volume CSF between the caudate and the thalamus) are dropped.
    """
    from scipy import ndimage

    brain = t1 > 0.02
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    depth = ndimage.distance_transform_edt(brain) * float(abs(affine[0, 0]))  # mm from the brain's surface
    region = (csf > 0.5) & (depth > _VENTRICLE_DEPTH_MM)
    region &= _in_ellipsoid(_mni_coordinates(t1.shape, affine), _VENTRICLE_CENTRE, _VENTRICLE_RADII)
    parts, n = ndimage.label(region)
    sizes = ndimage.sum(region, parts, range(1, n + 1))
    return np.isin(parts, 1 + np.flatnonzero(sizes >= 100)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, coarse: tuple[int, int, int], scale: float) -> torch.Tensor:
    """A smooth random field (X, Y, Z) on the demo grid: Gaussian noise on a coarse grid, upsampled trilinearly."""
    noise = torch.from_numpy(rng.normal(0.0, scale, size=(1, 1, *coarse)).astype(np.float32))
    return F.interpolate(noise, size=DEMO_SHAPE, mode="trilinear", align_corners=True)[0, 0]


def _random_grid(rng: np.random.Generator) -> torch.Tensor:
    """Sampling grid (1, X, Y, Z, 3) for grid_sample: a small random affine plus a smooth displacement field."""
    angles = np.deg2rad(rng.uniform(-6.0, 6.0, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    theta = rot * rng.uniform(0.93, 1.07, size=3)
    # grid_sample's normalised coordinates: translation of a few voxels
    shift = rng.uniform(-3.0, 3.0, size=3) * 2.0 / np.array(DEMO_SHAPE)
    # grid_sample sees our (X, Y, Z) volume as (D, H, W) and orders grid coordinates (W, H, D): reverse the axes.
    mat = np.concatenate([theta[::-1, ::-1], shift[::-1, None]], axis=1)
    mat = torch.tensor(mat.copy(), dtype=torch.float32)
    # Everything is built on a 4x coarser grid and upsampled once: the affine part is linear, so trilinear
    # upsampling keeps it exact, and the displacement is smooth anyway (a third of the cost at full size).
    coarse_shape = tuple(n // 4 for n in DEMO_SHAPE)
    grid = F.affine_grid(mat[None], [1, 1, *coarse_shape], align_corners=True)  # (1, X/4, Y/4, Z/4, 3)
    # displacement of about 2 voxels (4 mm) RMS, correlated over ~2 cm; normalised units, grid axis order
    knots = torch.from_numpy(rng.normal(0.0, 2.0, size=(1, 3, 6, 7, 6)).astype(np.float32))
    disp = F.interpolate(knots, size=coarse_shape, mode="trilinear", align_corners=True)
    disp = disp * (2.0 / torch.tensor(DEMO_SHAPE[::-1], dtype=torch.float32)).view(1, 3, 1, 1, 1)
    coarse = (grid.permute(0, 4, 1, 2, 3) + disp).contiguous()  # (1, 3, X/4, Y/4, Z/4)
    return F.interpolate(coarse, size=DEMO_SHAPE, mode="trilinear", align_corners=True).permute(0, 2, 3, 4, 1)


def _warp(maps: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """Warp stacked maps (C, X, Y, Z) with one trilinear grid_sample."""
    out = F.grid_sample(torch.from_numpy(maps)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].numpy()


def _lesion_distances(
    rng: np.random.Generator, shape: tuple[int, ...], wm: np.ndarray, radii_vox: tuple[float, float], reach: float
) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """1-2 lesion sites centred in the white matter: per lesion its bounding box and the normalised distance from
    its centre inside the box (1 at the lesion border, an irregular ellipsoid with radii drawn from ``radii_vox``
    voxels per axis); ``reach`` is the largest distance the caller paints, which sizes the box."""
    candidates = np.argwhere(wm > 0.9)
    lesions = []
    for _ in range(int(rng.integers(1, 3))):
        centre = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(*radii_vox, size=3)
        # the wobble below can push the border out by ~15 %
        half = np.ceil(radii * reach * 1.3).astype(int)
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, shape)
        grid = np.indices(hi - lo, dtype=np.float32) + lo.reshape(3, 1, 1, 1)
        d = np.sqrt(sum(((grid[a] - centre[a]) / radii[a]) ** 2 for a in range(3)))
        lesions.append((tuple(slice(a, b) for a, b in zip(lo, hi)), d + _wobble(rng, d.shape)))
    return lesions


def _insert_lesions(rng: np.random.Generator, image: np.ndarray, wm: np.ndarray, radii_vox: tuple[float, float] = (4.0, 8.0),
                    core_reach: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Insert 1-2 ring-enhancing lesions (as in T1ce) centred in the white matter: a bright rim around a dark necrotic
    core that reaches ``core_reach`` of the radius; return the masks of the whole lesions and of their cores."""
    whole = np.zeros(image.shape, dtype=bool)
    core = np.zeros(image.shape, dtype=bool)
    wm_level = float(np.median(image[wm > 0.9]))
    for box, d in _lesion_distances(rng, image.shape, wm, radii_vox, reach=1.0):
        blob = d <= 1.0
        inner = d <= core_reach
        image[box][blob & ~inner] = wm_level * rng.uniform(1.5, 1.8)
        image[box][inner] = wm_level * rng.uniform(0.35, 0.55)
        whole[box] |= blob
        core[box] |= inner
    return whole, core


def _insert_flair_lesions(rng: np.random.Generator, image: np.ndarray, wm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert 1-2 FLAIR-like tumours into the white matter: a dark necrotic core (radii 7-13 mm; FLAIR suppresses its
    fluid as it does CSF's) inside a bright oedema reaching _OEDEMA_REACH times as far; return the masks of the whole
    tumours and of their cores."""
    whole = np.zeros(image.shape, dtype=bool)
    core = np.zeros(image.shape, dtype=bool)
    level = float(np.median(image[wm > 0.9]))
    for box, d in _lesion_distances(rng, image.shape, wm, (3.5, 6.5), reach=_OEDEMA_REACH):
        inner = d <= 1.0
        oedema = (d > 1.0) & (d <= _OEDEMA_REACH)
        image[box][oedema] = level * rng.uniform(1.7, 1.9)
        image[box][inner] = level * rng.uniform(0.5, 0.65)
        whole[box] |= inner | oedema
        core[box] |= inner
    return whole, core


def _flair_contrast(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """A FLAIR-like image from the tissue maps: CSF suppressed (dark), grey matter brighter than white matter."""
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return np.where(brain, 0.15 * csf + 0.65 * gm + 0.45 * wm, 0.0).astype(np.float32)


def _wobble(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth noise of the given shape (std about 0.1): a coarse 3×3×3 grid upsampled."""
    coarse = torch.from_numpy(rng.normal(0.0, 0.12, size=(1, 1, 3, 3, 3)).astype(np.float32))
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


def atlas_maps() -> dict[str, np.ndarray]:
    """The template maps every task warps (T1, GM, WM and the two structure masks), and the grid's affine."""
    t1, gm, wm, affine = _load_atlas()
    return {"t1": t1, "gm": gm, "wm": wm, "hippocampus": _hippocampal_region(gm, affine),
            "ventricles": _ventricles(t1, gm, wm, affine), "affine": affine}


# warp only what a task needs: the T1 and the WM map (lesion sites), the structure mask, or the tissue maps
_TASK_MAPS = {"source": ("t1", "wm"), "necrosis": ("t1", "wm"), "ventricles": ("t1", "ventricles"), "hippocampus": ("t1", "hippocampus"),
              "flair": ("t1", "wm", "gm")}


def _make_subject(rng: np.random.Generator, atlas: dict[str, np.ndarray], task: str) -> tuple[np.ndarray, np.ndarray]:
    """One subject: (int16 image, uint8 label) on the demo grid."""
    warped = _warp(np.stack([atlas[name] for name in _TASK_MAPS[task]]), _random_grid(rng))
    brain = warped[0] > 0.02
    image = np.where(brain, warped[0], 0.0).astype(np.float32)
    if task == "source":  # lesions 8-16 mm in radius, label = whole lesion (BraTS' whole tumour)
        label = _insert_lesions(rng, image, warped[1])[0]
    elif task == "necrosis":  # larger lesions (12-20 mm), label = the necrotic core only, an eighth of the volume
        label = _insert_lesions(rng, image, warped[1], (6.0, 10.0), core_reach=0.5)[1]
    elif task == "flair":
        image = _flair_contrast(warped[2], warped[1], brain)
        label = _insert_flair_lesions(rng, image, warped[1])[1]
    else:
        label = warped[1] >= 0.5
    label &= brain
    # contrast (gamma), bias field, global gain and noise; background kept at 0
    image = np.clip(image, 0.0, None) ** rng.uniform(0.8, 1.25)
    bias = np.exp(_smooth_field(rng, (3, 3, 3), 0.12).numpy())
    noise = rng.normal(0.0, rng.uniform(0.01, 0.03), size=image.shape).astype(np.float32)
    image = (image * bias + noise) * rng.uniform(800.0, 1200.0)
    image = np.where(brain, np.clip(image, 1.0, None), 0.0)
    return np.round(image).astype(np.int16), label.astype(np.uint8)


def _write_subject(folder: Path, i: int, task: str, seed: int, atlas: dict[str, np.ndarray]) -> None:
    """``folder/sub{i}``: subject i of ``task``, from its own generator (seed, task code, i)."""
    sid = f"sub{i}"
    image, label = _make_subject(np.random.default_rng([seed, DEMO_TASKS[task][0], i]), atlas, task)
    (folder / sid).mkdir(parents=True)
    for arr, suffix in ((image, "img"), (label, "mask")):
        img = nib.Nifti1Image(arr, atlas["affine"])
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, folder / sid / f"{sid}_{suffix}.nii.gz")


def _write_task(folder: Path, task: str, seed: int, atlas: dict[str, np.ndarray]) -> None:
    code, n_train, n_val, n_test = DEMO_TASKS[task]
    ids = [f"sub{i}" for i in range(1, n_train + n_val + n_test + 1)]
    for i in range(1, len(ids) + 1):
        _write_subject(folder, i, task, seed, atlas)
    lists = {"train.txt": ids[:n_train], "valid.txt": ids[n_train : n_train + n_val], "test.txt": ids[n_train + n_val :]}
    for name, part in lists.items():
        (folder / name).write_text("".join(f"{sid}\n" for sid in part))


def _manifest(seed: int, tasks: set[str]) -> dict:
    return {
        "generator": "tcurlora_seg.data.demo",
        "version": DEMO_VERSION,
        "seed": seed,
        "shape": list(DEMO_SHAPE),
        "spacing_mm": [2.0, 2.0, 2.0],
        "tasks": {name: dict(zip(("train", "val", "test"), spec[1:])) for name, spec in DEMO_TASKS.items() if name in tasks},
    }


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _built_tasks(root: Path, seed: int) -> set[str]:
    """Tasks of a cache that this generator version built with this seed (none for another version or seed)."""
    found = _read_manifest(root)
    if not found or found.get("version") != DEMO_VERSION or found.get("seed") != seed:
        return set()
    return {task for task in found.get("tasks", {}) if task in DEMO_TASKS and (root / task).is_dir()}


def _wanted(tasks: Iterable[str] | None) -> set[str]:
    wanted = set(DEMO_TASKS) if tasks is None else set(tasks)
    unknown = sorted(wanted - set(DEMO_TASKS))
    if unknown:
        raise UserError(f"data.demo.task={unknown[0]!r}: not a demo task; choose one of {', '.join(DEMO_TASKS)}")
    return wanted


def demo_is_built(root: str | Path, seed: int = 0, tasks: Iterable[str] | None = None) -> bool:
    """True when ``root`` holds ``tasks`` (default: every demo task) of this generator version and seed."""
    return _wanted(tasks) <= _built_tasks(Path(root), seed)


def build_demo(root: str | Path, seed: int = 0, force: bool = False, tasks: Iterable[str] | None = None) -> Path:
    """Build ``tasks`` of the demo cohort (default: all of DEMO_TASKS) into ``root/<task>`` unless they are there.

    Each piece is written into a temporary folder and moved into place at the end, so an interrupted build never
    looks complete. A cache of this version and seed that lacks a task (one asked for later, or added to the
    generator later) gets just that task; any other existing ``root`` (another generator version or seed, with
    whatever it holds, such as a source model pretrained on its data) is replaced only when it is an older demo (it
    has the manifest) or empty.
    """
    root = Path(root)
    wanted = _wanted(tasks)
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise UserError(f"{root}: not empty and not a demo cache; choose another data.root for the demo or empty it")
    kept = set() if force else _built_tasks(root, seed)
    if wanted <= kept:
        return root
    atlas = atlas_maps()
    if kept:
        _add_tasks(root, [task for task in DEMO_TASKS if task in wanted - kept], seed, atlas, kept)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for task in DEMO_TASKS:
            if task in wanted:
                _write_task(tmp / task, task, seed, atlas)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(seed, wanted), indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _add_tasks(root: Path, tasks: list[str], seed: int, atlas: dict[str, np.ndarray], kept: set[str]) -> None:
    """Write ``tasks`` into an existing cache, then the manifest that lists them (replaced atomically, last)."""
    tmp = Path(tempfile.mkdtemp(prefix=".add-", dir=root))
    try:
        for task in tasks:
            _write_task(tmp / task, task, seed, atlas)
            if (root / task).exists():  # a leftover that the manifest does not list
                shutil.rmtree(root / task)
            (tmp / task).rename(root / task)
        manifest = _manifest(seed, kept | set(tasks))
        recorded = (_read_manifest(root) or {}).get("tasks", {})
        manifest["tasks"].update({task: recorded[task] for task in kept if task in recorded})  # their pools too
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / MANIFEST).replace(root / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the training pool of a shots sweep -------------------------------------------------------------------------------
# POOL_LIST in a task folder lists its training pool: the task's own training cases first, then extra ones numbered
# after its test cases (sub{train+val+test+1}, ...), so that growing the pool adds subjects and changes none: the
# validation and test cases, train.txt (what a run without data.demo.train trains on) and the source model cached
# beside them stay as they were, and the first k of the list are the same whatever the pool size.
POOL_LIST = "train_pool.txt"


def pool_ids(task: str, n: int) -> list[str]:
    """The first ``n`` training cases of ``task``'s pool."""
    _, n_train, n_val, n_test = DEMO_TASKS[task]
    extra = range(n_train + n_val + n_test + 1, n_train + n_val + n_test + 1 + max(0, n - n_train))
    return [f"sub{i}" for i in range(1, min(n, n_train) + 1)] + [f"sub{i}" for i in extra]


def build_pool(root: str | Path, task: str, n: int, seed: int = 0) -> Path:
    """Build ``task`` (``build_demo``) with a training pool of at least ``n`` cases; returns the pool's list file.

    Only the subjects the pool lacks are generated, each into a temporary folder first; the list file and then the
    manifest (which records the pool size) are replaced last, so an interrupted growth never looks complete.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"data.demo.train={n!r}: give the number of training cases the demo pool holds (an int >= 1)")
    root = Path(root)
    build_demo(root, seed=seed, tasks=[task])
    manifest = _read_manifest(root)
    entry = manifest["tasks"][task]
    have = int(entry.get("pool", entry["train"]))
    folder, want = root / task, max(n, have)
    if want > have or not (folder / POOL_LIST).is_file():
        atlas = atlas_maps() if want > have else None
        tmp = Path(tempfile.mkdtemp(prefix=".pool-", dir=folder))
        try:
            for sid in pool_ids(task, want)[have:]:
                _write_subject(tmp, int(sid[3:]), task, seed, atlas)
                if (folder / sid).exists():  # a leftover of an interrupted growth that the manifest does not list
                    shutil.rmtree(folder / sid)
                (tmp / sid).rename(folder / sid)
            (tmp / POOL_LIST).write_text("".join(f"{sid}\n" for sid in pool_ids(task, want)))
            (tmp / POOL_LIST).replace(folder / POOL_LIST)
            entry["pool"] = want
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            (tmp / MANIFEST).replace(root / MANIFEST)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / POOL_LIST


def with_pool(cfg_data: dict) -> dict:
    """``cfg_data`` (a resolved ``data`` section) training on the demo's pool when ``data.demo.train`` asks for one:
    the pool is built first and ``split.files.train`` names its list (the first ``data.split.shots`` of it train).
    Unchanged for other data."""
    demo = cfg_data.get("demo") or {}
    if demo.get("train") is None:
        return cfg_data
    root = Path(str(cfg_data["root"]))
    build_pool(root.parent, demo.get("task", root.name), demo["train"], seed=int(demo.get("seed", 0)))
    split = cfg_data.get("split") or {}
    return {**cfg_data, "split": {**split, "files": {**(split.get("files") or {}), "train": POOL_LIST}}}
