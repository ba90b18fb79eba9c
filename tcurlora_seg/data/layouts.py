"""Dataset layouts on disk -> lists of cases ``{"image": path, "label": path, "id": str}`` for train / val / test.

- ``official``:  t-CURLoRA / LoRA-PT layout, ``sub{i}/sub{i}_img.nii.gz`` + ``sub{i}_mask.nii.gz`` (EADC-ADNI, LPBA40, UPENN-GBM).
- ``brats2021``: ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``; ``data.modality`` picks the image(s).
- ``decathlon``: a Medical Segmentation Decathlon ``dataset.json`` (``training`` list), or nnU-Net v2's ``dataset.json``
  with ``imagesTr/{id}_{0000..}`` and ``labelsTr/{id}``. ``data.modality`` (channel indices) picks nnU-Net's channel
  files here, and the channels of MSD's 4-D files (Task01: FLAIR, T1w, T1gd, T2w) in the transforms.

Labels are never rewritten here: ``data.label_map`` is applied by a transform (see transforms.py).
A case's image is a path, or a list of paths when several modalities / channels are used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tcurlora_seg.data import splits as _splits
from tcurlora_seg.data.demo import build_demo
from tcurlora_seg.errors import UserError

__all__ = ["LAYOUTS", "BRATS_MODALITIES", "load_cases"]

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
_README = "see data/README.md"


def _nifti(folder: Path, stem: str) -> str:
    """``folder/stem.nii.gz``, or ``stem.nii`` when only the uncompressed file exists (a missing file is left to check)."""
    gz = folder / f"{stem}.nii.gz"
    plain = folder / f"{stem}.nii"
    return str(plain if not gz.exists() and plain.exists() else gz)


def _has_nifti(folder: Path, stem: str) -> bool:
    return (folder / f"{stem}.nii.gz").is_file() or (folder / f"{stem}.nii").is_file()


# --- official -------------------------------------------------------------------------------------------------------


def _official_ids(root: Path, cfg: Mapping[str, Any]) -> list[str]:
    return [d.name for d in root.iterdir() if d.is_dir() and _has_nifti(d, f"{d.name}_img")]


def _official_case(root: Path, case_id: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    folder = root / case_id
    return {"image": _nifti(folder, f"{case_id}_img"), "label": _nifti(folder, f"{case_id}_mask"), "id": case_id}


# --- BraTS 2021 -----------------------------------------------------------------------------------------------------


def _brats_modalities(cfg: Mapping[str, Any]) -> list[str]:
    modality = cfg.get("modality") or "t1ce"
    names = [modality] if isinstance(modality, str) else list(modality)
    bad = [m for m in names if m not in BRATS_MODALITIES]
    if bad or not names:
        raise UserError(f"data.modality={modality!r}: choose from {', '.join(BRATS_MODALITIES)} (one name or a list)")
    return names


def _brats_ids(root: Path, cfg: Mapping[str, Any]) -> list[str]:
    return [d.name for d in root.iterdir() if d.is_dir() and _has_nifti(d, f"{d.name}_seg")]


def _brats_case(root: Path, case_id: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    folder = root / case_id
    images = [_nifti(folder, f"{case_id}_{m}") for m in _brats_modalities(cfg)]
    return {"image": images[0] if len(images) == 1 else images, "label": _nifti(folder, f"{case_id}_seg"), "id": case_id}


# --- Decathlon / nnU-Net v2 -----------------------------------------------------------------------------------------


def _strip_ending(name: str, ending: str) -> str:
    return name[: -len(ending)] if name.endswith(ending) else name.split(".")[0]


def _decathlon_index(root: Path, cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """id -> case for every labelled case that dataset.json describes."""
    path = root / "dataset.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; the decathlon layout needs the dataset.json of MSD or nnU-Net v2 ({_README})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg}); restore the file from the dataset download") from err
    cases: dict[str, dict[str, Any]] = {}
    if isinstance(meta.get("training"), list):  # MSD: explicit image/label pairs, paths relative to root
        _check_msd_channels(path, meta, cfg)
        for item in meta["training"]:
            case_id = _strip_ending(Path(item["label"]).name, ".nii.gz")
            cases[case_id] = {"image": str(root / item["image"]), "label": str(root / item["label"]), "id": case_id}
        return cases
    # nnU-Net v2: channels are files {id}_{0000..}{ending} in imagesTr/, labels {id}{ending} in labelsTr/
    ending = meta.get("file_ending", ".nii.gz")
    channels = sorted(int(k) for k in (meta.get("channel_names") or meta.get("modality") or {"0": ""}))
    wanted = cfg.get("modality")
    if wanted is not None:  # a subset of channel indices
        wanted = [wanted] if isinstance(wanted, int) else list(wanted)
        if any(not isinstance(c, int) or c not in channels for c in wanted):
            raise UserError(f"data.modality={wanted!r}: for nnU-Net data give channel indices from {channels} or null for all")
        channels = wanted
    for label in sorted((root / "labelsTr").glob(f"*{ending}")):
        case_id = _strip_ending(label.name, ending)
        images = [str(root / "imagesTr" / f"{case_id}_{c:04d}{ending}") for c in channels]
        cases[case_id] = {"image": images[0] if len(images) == 1 else images, "label": str(label), "id": case_id}
    return cases


def _check_msd_channels(path: Path, meta: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """``data.modality`` against the channels MSD's dataset.json names (``"modality": {"0": "FLAIR", ...}``); the
    transforms pick them from each 4-D file, and the data check counts what each file holds."""
    from tcurlora_seg.data.transforms import channel_indices

    wanted, modality = cfg.get("modality"), meta.get("modality")
    if wanted is None or not isinstance(modality, Mapping):
        return
    indices = channel_indices(cfg)
    names = {int(k): str(v) for k, v in modality.items()}
    if indices is None or any(c not in names for c in indices):
        listed = ", ".join(f"{k} {v}" for k, v in sorted(names.items()))
        raise UserError(f"data.modality={wanted!r}: {path} names the channels {listed}; give a list of those indices or null for all")


_INDEX_CACHE: dict[str, Any] = {}


def _decathlon_ids(root: Path, cfg: Mapping[str, Any]) -> list[str]:
    return list(_decathlon_index(root, cfg))


def _decathlon_case(root: Path, case_id: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    # one parse of dataset.json per load_cases call, not one per case
    key = (str(root), repr(cfg.get("modality")))
    if _INDEX_CACHE.get("key") != key:
        _INDEX_CACHE.update(key=key, index=_decathlon_index(root, cfg))
    found = _INDEX_CACHE["index"].get(case_id)
    if found is None:  # listed in a split but unknown to dataset.json: let the integrity check report the missing files
        found = {"image": str(root / "imagesTr" / f"{case_id}.nii.gz"), "label": str(root / "labelsTr" / f"{case_id}.nii.gz"), "id": case_id}
    return found


LAYOUTS: dict[str, tuple[Callable[..., list[str]], Callable[..., dict[str, Any]], str]] = {
    "official": (_official_ids, _official_case, "sub{i}/sub{i}_img.nii.gz + sub{i}_mask.nii.gz"),
    "brats2021": (_brats_ids, _brats_case, "BraTS2021_XXXXX/BraTS2021_XXXXX_{t1ce,seg}.nii.gz"),
    "decathlon": (_decathlon_ids, _decathlon_case, "dataset.json with imagesTr/ and labelsTr/"),
}


def _ensure_demo(cfg: Mapping[str, Any], root: Path) -> None:
    """Build the embedded demo when data.demo is set and its cache is missing or stale (fast no-op otherwise)."""
    demo = cfg.get("demo")
    if not demo:
        return
    task = demo.get("task", root.name)
    if root.name != task:
        raise UserError(f"data.root={root}: a demo root must end in the task folder '{task}' (e.g. .cache/demo/{task})")
    build_demo(root.parent, seed=int(demo.get("seed", 0)), tasks=[task])


def _split_ids(root: Path, cfg: Mapping[str, Any], discover: Callable[[], list[str]]) -> dict[str, list[str]]:
    split_cfg = cfg.get("split") or {}
    if split_cfg.get("file"):
        ids = _splits.read_split_file(Path(split_cfg["file"]))
    else:
        files = {s: root / name for s, name in (split_cfg.get("files") or {}).items() if name}
        unknown = set(files) - set(_splits.SPLITS)
        if unknown:
            raise UserError(f"data.split.files: unknown split(s) {sorted(unknown)}; use train, val and test")
        if any(p.is_file() for p in files.values()):
            ids = {s: _splits.read_id_list(files[s]) if s in files and files[s].is_file() else [] for s in _splits.SPLITS}
        else:
            ids = _splits.seeded_split(discover(), split_cfg)
    exclude = set(split_cfg.get("exclude") or [])
    return {s: [i for i in ids[s] if i not in exclude] for s in _splits.SPLITS}


def load_cases(cfg_data: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Cases per split ("train", "val", "test") for the dataset that ``cfg_data`` (the ``data`` config group) describes.

    Split source, first that applies: ``split.file`` (a split.json of an earlier run); list files ``split.files``
    found in the root (official ``train.txt`` / ``valid.txt`` / ``test.txt``); a seeded split of all cases found,
    by ``split.train`` / ``val`` / ``test`` counts or fractions. ``split.exclude`` ids are dropped in every case.
    """
    layout = cfg_data.get("layout")
    if layout not in LAYOUTS:
        raise UserError(f"data.layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    if not cfg_data.get("root"):
        raise UserError(f"data.root is not set: point it at the {layout} dataset folder ({_README})")
    root = Path(str(cfg_data["root"])).expanduser()
    _ensure_demo(cfg_data, root)
    if not root.is_dir():
        raise UserError(f"data.root={root}: folder not found; obtain the dataset and lay it out as {layout} ({_README})")
    discover_ids, make_case, pattern = LAYOUTS[layout]

    def discover() -> list[str]:
        found = discover_ids(root, cfg_data)
        if not found:
            raise UserError(f"data.root={root}: no cases in the {layout} layout ({pattern}); check the folder ({_README})")
        return found

    _INDEX_CACHE.clear()  # dataset.json may have changed since the last call
    ids = _split_ids(root, cfg_data, discover)
    return {s: [make_case(root, i, cfg_data) for i in ids[s]] for s in _splits.SPLITS}
