from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_helpers import CONFIGS, compose_data
from hydra import compose, initialize_config_dir
from tcurlora_seg.data import demo
from tcurlora_seg.data.check import check_dataset
from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.errors import UserError


pytestmark = pytest.mark.xdist_group("demo")  # one worker builds the demo the tests share


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.build_demo(tmp_path_factory.mktemp("demo") / "demo", seed=0)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_atlas_loads_offline_from_package_data(no_network: None) -> None:
    t1, gm, wm, affine = demo._load_atlas()
    assert t1.shape == gm.shape == wm.shape == demo.DEMO_SHAPE
    assert np.allclose(np.diag(affine)[:3], 2.0)
    assert 0 < gm.max() <= 1 and 0 < wm.max() <= 1 and (t1 > 0).mean() > 0.2
    assert (t1[:, :, -1] == 0).all()  # the padded slice (and the background) are 0: skull-stripped


def test_subjects_are_deterministic_for_a_seed() -> None:
    atlas = demo.atlas_maps()
    for task in demo.DEMO_TASKS:
        a = demo._make_subject(np.random.default_rng([0, 1, 3]), atlas, task)
        b = demo._make_subject(np.random.default_rng([0, 1, 3]), atlas, task)
        c = demo._make_subject(np.random.default_rng([1, 1, 3]), atlas, task)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])


def test_demo_has_every_task_in_the_official_layout(demo_root: Path) -> None:
    manifest = json.loads((demo_root / "demo.json").read_text())
    assert manifest["version"] == demo.DEMO_VERSION and manifest["seed"] == 0
    assert set(manifest["tasks"]) == {"source", "necrosis", "ventricles", "hippocampus", "flair"}
    counts = {"demo": ("necrosis", [5, 3, 10]), "demo_source": ("source", [16, 4, 0]), "demo_flair": ("flair", [5, 3, 10]),
              "demo_ventricles": ("ventricles", [5, 3, 10]), "demo_hippocampus": ("hippocampus", [5, 3, 10])}
    for config, (task, expected) in counts.items():
        cases = load_cases(compose_data(config, [f"data.root={demo_root / task}", "data.demo=null"]))
        assert [len(cases[s]) for s in ("train", "val", "test")] == expected, config


def test_demo_volumes_are_small_binary_and_non_empty(demo_root: Path) -> None:
    sums = {}
    for task in demo.DEMO_TASKS:
        for folder in sorted((demo_root / task).glob("sub*")):
            image = nib.load(folder / f"{folder.name}_img.nii.gz")
            label = np.asarray(nib.load(folder / f"{folder.name}_mask.nii.gz").dataobj)
            assert image.shape == label.shape == (96, 112, 96)
            assert np.allclose(image.header.get_zooms(), 2.0)
            assert set(np.unique(label)) == {0, 1}
            data = np.asarray(image.dataobj)
            assert (data[label == 1] > 0).all()  # labels lie inside the brain
            sums.setdefault(task, []).append(int(label.sum()))
    # anatomy: a fixed structure of similar size in every subject; lesions vary
    assert 300 < np.mean(sums["hippocampus"]) < 2000 and np.std(sums["hippocampus"]) < 0.3 * np.mean(sums["hippocampus"])
    assert 1000 < np.mean(sums["ventricles"]) < 3000 and np.std(sums["ventricles"]) < 0.3 * np.mean(sums["ventricles"])
    for task in ("source", "necrosis", "flair"):
        assert len(set(sums[task])) > 10, task
    # the targets' lesion labels are cores: smaller than the source's whole lesions
    assert np.mean(sums["necrosis"]) < 0.5 * np.mean(sums["source"])


@pytest.mark.parametrize("task", ["necrosis", "flair"])
def test_whole_lesion_masks_score_under_30_percent_on_the_targets_cores(task: str) -> None:
    """A model that marks whole lesions (the source task's label) cannot do the target zero-shot: even perfect
    whole-lesion masks score under 30 % Dice on the core labels on average (25 % here), while the cores lie inside the
    lesions."""
    atlas = demo.atlas_maps()
    insert = {"necrosis": lambda rng, image, wm: demo._insert_lesions(rng, image, wm, (6.0, 10.0), core_reach=0.5),
              "flair": demo._insert_flair_lesions}[task]
    dice = []
    for i in range(8):
        image, wm = atlas["t1"].copy(), atlas["wm"]
        whole, core = insert(np.random.default_rng([0, 5, i]), image, wm)
        assert core.any() and not (core & ~whole).any()
        dice.append(2 * core.sum() / (core.sum() + whole.sum()))
        ring = whole & ~core
        if task == "necrosis":  # T1ce: a dark necrotic core inside a bright rim
            assert image[core].mean() < image[wm > 0.9].mean() < image[ring].mean()
        else:  # FLAIR: the core's fluid suppressed like CSF, inside a bright oedema
            assert image[core].mean() < image[ring].mean()
    assert np.mean(dice) < 0.25


def test_ventricles_are_deep_dark_and_at_the_midline() -> None:
    atlas = demo.atlas_maps()
    ventricles = atlas["ventricles"] > 0
    xyz = nib.affines.apply_affine(atlas["affine"], np.argwhere(ventricles))
    assert 1500 < ventricles.sum() < 3000 and abs(xyz[:, 0].mean()) < 3  # both sides, symmetric template
    assert (xyz[:, 0] < -5).sum() > 400 and (xyz[:, 0] > 5).sum() > 400  # two lateral ventricles
    t1, wm = atlas["t1"], atlas["wm"]
    assert t1[ventricles].mean() < 0.6 * t1[wm > 0.9].mean()  # CSF is dark in T1


def test_flair_contrast_suppresses_csf_and_cores_are_dark_in_a_bright_oedema(demo_root: Path) -> None:
    from scipy import ndimage

    t1, gm, wm, _ = demo._load_atlas()
    flair = demo._flair_contrast(gm, wm, t1 > 0.02)
    csf = (t1 > 0.02) & (gm + wm < 0.1)
    assert flair[gm > 0.9].mean() > flair[wm > 0.9].mean() > flair[csf].mean()  # the order of T1 turned over
    assert t1[gm > 0.9].mean() < t1[wm > 0.9].mean()
    for folder in sorted((demo_root / "flair").glob("sub*"))[:5]:
        image = np.asarray(nib.load(folder / f"{folder.name}_img.nii.gz").dataobj).astype(float)
        core = np.asarray(nib.load(folder / f"{folder.name}_mask.nii.gz").dataobj) > 0
        shell = ndimage.binary_dilation(core, iterations=2) & ~core & (image > 0)  # the oedema next to the core
        tissue = image[(image > 0) & ~ndimage.binary_dilation(core, iterations=12)]
        assert np.median(image[shell]) > np.percentile(tissue, 95), folder.name  # the oedema is the brightest
        assert np.median(image[core]) < np.median(tissue) < np.median(image[shell]), folder.name


def test_tasks_differ_and_the_hippocampus_task_is_where_the_hippocampi_are(demo_root: Path) -> None:
    label = nib.load(demo_root / "hippocampus" / "sub1" / "sub1_mask.nii.gz")
    ijk = np.argwhere(np.asarray(label.dataobj) > 0)
    xyz = nib.affines.apply_affine(label.affine, ijk)
    left, right = xyz[xyz[:, 0] < 0], xyz[xyz[:, 0] > 0]
    for side, x in ((left, -28), (right, 28)):
        assert len(side) > 100
        assert np.allclose(side.mean(0), [x, -22, -14], atol=8)  # MNI hippocampus, within the deformation
    source = np.asarray(nib.load(demo_root / "source" / "sub1" / "sub1_mask.nii.gz").dataobj)
    overlap = (source > 0) & (np.asarray(label.dataobj) > 0)
    assert overlap.sum() < 0.1 * source.sum()


def test_demo_passes_the_integrity_check(demo_root: Path) -> None:
    for name, task in (("demo", "necrosis"), ("demo_source", "source"), ("demo_ventricles", "ventricles")):
        cfg = compose_data(name, [f"data.root={demo_root / task}", "data.demo=null"])
        result = check_dataset(cfg, load_cases(cfg))
        assert result.problems == [] and result.warnings == []


def test_cache_is_reused_and_rebuilt_when_stale(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = (demo_root / "necrosis" / "sub1" / "sub1_img.nii.gz").stat().st_mtime_ns
    assert demo.build_demo(demo_root, seed=0) == demo_root
    assert (demo_root / "necrosis" / "sub1" / "sub1_img.nii.gz").stat().st_mtime_ns == stamp
    assert demo.demo_is_built(demo_root, seed=0) and not demo.demo_is_built(demo_root, seed=1)
    monkeypatch.setattr(demo, "DEMO_VERSION", demo.DEMO_VERSION + 1)
    assert not demo.demo_is_built(demo_root, seed=0)


def test_a_task_missing_from_the_cache_is_added_without_rebuilding_the_others(
    demo_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    manifest = json.loads((root / "demo.json").read_text())
    del manifest["tasks"]["flair"]  # a cache from before the flair task existed
    (root / "demo.json").write_text(json.dumps(manifest))
    shutil.rmtree(root / "flair")
    (root / "source_unetr.pt").write_bytes(b"the source model cached beside the tasks")
    stamp = (root / "necrosis" / "sub1" / "sub1_img.nii.gz").stat().st_mtime_ns
    assert not demo.demo_is_built(root) and demo.demo_is_built(root, tasks=["necrosis", "source"])
    demo.build_demo(root)
    assert demo.demo_is_built(root)
    assert (root / "source_unetr.pt").read_bytes() == b"the source model cached beside the tasks"
    assert (root / "necrosis" / "sub1" / "sub1_img.nii.gz").stat().st_mtime_ns == stamp
    for name in ("sub1_img.nii.gz", "sub1_mask.nii.gz"):  # the added task is the one a full build writes
        added = np.asarray(nib.load(root / "flair" / "sub1" / name).dataobj)
        assert np.array_equal(added, np.asarray(nib.load(demo_root / "flair" / "sub1" / name).dataobj))
    assert sorted(p.name for p in root.iterdir()) == ["demo.json", "flair", "hippocampus", "necrosis", "source",
                                                      "source_unetr.pt", "ventricles"]


def test_only_the_tasks_asked_for_are_built(demo_root: Path, tmp_path: Path) -> None:
    root = demo.build_demo(tmp_path / "demo", tasks=["necrosis"])
    assert sorted(p.name for p in root.iterdir()) == ["demo.json", "necrosis"]
    assert demo.demo_is_built(root, tasks=["necrosis"]) and not demo.demo_is_built(root)
    demo.build_demo(root, tasks=["source"])  # a second task joins the first
    assert set(json.loads((root / "demo.json").read_text())["tasks"]) == {"necrosis", "source"}
    for task in ("necrosis", "source"):  # the same subjects as a full build
        name = "sub2/sub2_mask.nii.gz"
        assert np.array_equal(np.asarray(nib.load(root / task / name).dataobj), np.asarray(nib.load(demo_root / task / name).dataobj))
    with pytest.raises(UserError, match="data.demo.task='tumour'"):
        demo.build_demo(root, tasks=["tumour"])


def test_demo_config_builds_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr("tcurlora_seg.data.layouts.build_demo", lambda root, seed, tasks: calls.append((root, seed, tasks)))
    cfg = compose_data("demo", [f"data.root={tmp_path / 'cache' / 'necrosis'}"])
    with pytest.raises(UserError):  # nothing was built by the stub, so the root is missing
        load_cases(cfg)
    assert calls == [(tmp_path / "cache", 0, ["necrosis"])]
    with pytest.raises(UserError, match="task folder"):
        load_cases({**cfg, "root": str(tmp_path / "cache" / "elsewhere")})


def test_demo_never_overwrites_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a demo cache"):
        demo.build_demo(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_both_demo_targets_fine_tune_the_one_cached_source_model() -> None:
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        source = compose("train", overrides=["+experiment=demo_source"])
        targets = {name: compose("train", overrides=[f"+experiment={name}"])
                   for name in ("demo", "demo_flair", "demo_ventricles", "demo_hippocampus")}
    for name, cfg in targets.items():
        assert cfg.data.pretrained == source.export_model, name  # the source run's export is what both load
        assert cfg.data.pretrain_experiment == "demo_source", name
        same_model = {k: v for k, v in cfg.model.items() if k != "pretrained"}
        assert same_model == {k: v for k, v in source.model.items() if k != "pretrained"}, name
        assert Path(cfg.data.root).name == cfg.data.demo.task and Path(cfg.data.root).parent == Path(source.data.root).parent
    assert targets["demo_flair"].data.demo.task == "flair" and targets["demo_flair"].peft.name == "tcurlora"
