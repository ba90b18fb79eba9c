from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_helpers import compose_data, make_official, tiny_case, write_nifti
from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.errors import UserError


def ids(cases: dict) -> dict[str, list[str]]:
    return {s: [c["id"] for c in v] for s, v in cases.items()}


def test_official_layout_reads_list_files(official_root: Path) -> None:
    cases = load_cases(compose_data("official", [f"data.root={official_root}"]))
    assert ids(cases) == {"train": ["sub1", "sub2"], "val": ["sub3"], "test": ["sub4", "sub5", "sub6"]}
    case = cases["train"][0]
    assert case["image"] == str(official_root / "sub1" / "sub1_img.nii.gz")
    assert case["label"] == str(official_root / "sub1" / "sub1_mask.nii.gz")
    assert all(Path(c["image"]).is_file() and Path(c["label"]).is_file() for v in cases.values() for c in v)


def test_official_list_lines_may_be_folder_paths(tmp_path: Path) -> None:
    # the official code writes lines such as "Datasets/EADC/sub1": the id is the last component
    root = make_official(tmp_path / "ds", 2)
    (root / "train.txt").write_text("Datasets/EADC/sub1\n\n# comment\n")
    (root / "test.txt").write_text("sub2/\n")
    cases = load_cases(compose_data("official", [f"data.root={root}"]))
    assert ids(cases) == {"train": ["sub1"], "val": [], "test": ["sub2"]}


def test_official_seeded_split_without_list_files(tmp_path: Path) -> None:
    root = make_official(tmp_path / "ds", 10)
    cfg = compose_data("official", [f"data.root={root}", "data.split.train=5", "data.split.val=2", "data.split.test=null"])
    cases = ids(load_cases(cfg))
    assert [len(cases[s]) for s in ("train", "val", "test")] == [5, 2, 3]
    assert sorted(sum(cases.values(), [])) == sorted(f"sub{i}" for i in range(1, 11))


def test_official_accepts_uncompressed_nifti(tmp_path: Path) -> None:
    image, label = tiny_case()
    write_nifti(tmp_path / "ds" / "sub1" / "sub1_img.nii", image)
    write_nifti(tmp_path / "ds" / "sub1" / "sub1_mask.nii", label)
    cases = load_cases(compose_data("official", [f"data.root={tmp_path / 'ds'}", "data.split.train=1"]))
    assert cases["train"][0]["image"].endswith("sub1_img.nii")


def test_exclusions_are_honoured_with_list_files_and_seeded_splits(tmp_path: Path) -> None:
    root = make_official(tmp_path / "ds", 8, {"train": [1, 2, 8], "test": [3, 4, 5]})
    cfg = compose_data("eadc", [f"data.root={root}", "data.split.exclude=[sub8,sub3]"])
    assert ids(load_cases(cfg)) == {"train": ["sub1", "sub2"], "val": [], "test": ["sub4", "sub5"]}
    for f in ("train.txt", "test.txt"):
        (root / f).unlink()
    cases = ids(load_cases(compose_data("eadc", [f"data.root={root}", "data.split.exclude=[sub8,sub3]"])))
    used = sum(cases.values(), [])
    assert "sub8" not in used and "sub3" not in used and len(used) == 6 and len(cases["train"]) == 5


def _make_brats(root: Path, n: int) -> None:
    for i in range(n):
        cid = f"BraTS2021_{i:05d}"
        image, label = tiny_case(seed=i)
        for mod in ("t1", "t1ce", "t2", "flair"):
            write_nifti(root / cid / f"{cid}_{mod}.nii.gz", image)
        write_nifti(root / cid / f"{cid}_seg.nii.gz", label * 4)


def test_brats2021_layout_picks_the_configured_modality(tmp_path: Path) -> None:
    _make_brats(tmp_path / "brats", 5)
    cfg = compose_data("brats2021", [f"data.root={tmp_path / 'brats'}", "data.split.train=3", "data.split.val=1", "data.split.test=1"])
    cases = load_cases(cfg)
    assert [len(cases[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    case = cases["train"][0]
    assert case["image"].endswith(f"{case['id']}_t1ce.nii.gz") and case["label"].endswith(f"{case['id']}_seg.nii.gz")
    multi = load_cases({**cfg, "modality": ["t1", "flair"]})["train"][0]["image"]
    assert isinstance(multi, list) and [Path(p).name.split("_")[-1] for p in multi] == ["t1.nii.gz", "flair.nii.gz"]
    with pytest.raises(UserError, match="data.modality"):
        load_cases({**cfg, "modality": "t1gd"})


def test_decathlon_msd_dataset_json(tmp_path: Path) -> None:
    root = tmp_path / "Task04_Hippocampus"
    training = []
    for i in range(5):
        image, label = tiny_case(seed=i)
        write_nifti(root / "imagesTr" / f"hippocampus_{i:03d}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"hippocampus_{i:03d}.nii.gz", label * 2)
        training.append({"image": f"./imagesTr/hippocampus_{i:03d}.nii.gz", "label": f"./labelsTr/hippocampus_{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "Hippocampus", "training": training, "test": []}))
    cfg = compose_data("msd_hippocampus", [f"data.root={root}", "data.split.train=3", "data.split.val=1", "data.split.test=null"])
    cases = load_cases(cfg)
    assert [len(cases[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    case = cases["train"][0]
    assert case["id"].startswith("hippocampus_") and Path(case["image"]).is_file() and Path(case["label"]).is_file()


def test_decathlon_nnunet_v2_channels(tmp_path: Path) -> None:
    root = tmp_path / "Dataset004_Hippocampus"
    for i in range(4):
        image, label = tiny_case(seed=i)
        for ch in range(2):
            write_nifti(root / "imagesTr" / f"case_{i:03d}_{ch:04d}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", label)
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "hippo": 1}, "numTraining": 4, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    cfg = compose_data("decathlon", [f"data.root={root}", "data.split.train=2", "data.split.val=1", "data.split.test=1"])
    case = load_cases(cfg)["train"][0]
    assert [Path(p).name for p in case["image"]] == [f"{case['id']}_0000.nii.gz", f"{case['id']}_0001.nii.gz"]
    one = load_cases({**cfg, "modality": [1]})["train"][0]
    assert one["image"].endswith("_0001.nii.gz")


def test_missing_root_names_the_data_readme(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data/README.md"):
        load_cases(compose_data("eadc", [f"data.root={tmp_path / 'nowhere'}"]))


def test_empty_root_and_unknown_layout_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no cases"):
        load_cases(compose_data("official", [f"data.root={tmp_path / 'empty'}"]))
    with pytest.raises(UserError, match="data.layout"):
        load_cases({"layout": "nifti_folder", "root": str(tmp_path)})
