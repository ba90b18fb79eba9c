from __future__ import annotations

import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_helpers import compose_data
from tcurlora_seg.data import demo
from tcurlora_seg.data.check import check_dataset
from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.errors import UserError


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
    t1, gm, wm, affine = demo._load_atlas()
    atlas = (t1, gm, wm, demo._hippocampal_region(gm, affine))
    for task in ("source", "target"):
        a = demo._make_subject(np.random.default_rng([0, 1, 3]), atlas, task)
        b = demo._make_subject(np.random.default_rng([0, 1, 3]), atlas, task)
        c = demo._make_subject(np.random.default_rng([1, 1, 3]), atlas, task)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])


def test_demo_has_both_tasks_in_the_official_layout(demo_root: Path) -> None:
    manifest = json.loads((demo_root / "demo.json").read_text())
    assert manifest["version"] == demo.DEMO_VERSION and manifest["seed"] == 0
    target = load_cases(compose_data("demo", [f"data.root={demo_root / 'target'}", "data.demo=null"]))
    source = load_cases(compose_data("demo_source", [f"data.root={demo_root / 'source'}", "data.demo=null"]))
    assert [len(target[s]) for s in ("train", "val", "test")] == [5, 3, 10]
    assert [len(source[s]) for s in ("train", "val", "test")] == [16, 4, 0]


def test_demo_volumes_are_small_binary_and_non_empty(demo_root: Path) -> None:
    sums = {}
    for task in ("source", "target"):
        for folder in sorted((demo_root / task).glob("sub*")):
            image = nib.load(folder / f"{folder.name}_img.nii.gz")
            label = np.asarray(nib.load(folder / f"{folder.name}_mask.nii.gz").dataobj)
            assert image.shape == label.shape == (96, 112, 96)
            assert np.allclose(image.header.get_zooms(), 2.0)
            assert set(np.unique(label)) == {0, 1}
            data = np.asarray(image.dataobj)
            assert (data[label == 1] > 0).all()  # labels lie inside the brain
            sums.setdefault(task, []).append(int(label.sum()))
    # target: a fixed structure of similar size in every subject; source: lesions that vary
    assert 300 < np.mean(sums["target"]) < 2000 and np.std(sums["target"]) < 0.3 * np.mean(sums["target"])
    assert len(set(sums["source"])) > 10


def test_tasks_differ_and_target_is_where_the_hippocampi_are(demo_root: Path) -> None:
    label = nib.load(demo_root / "target" / "sub1" / "sub1_mask.nii.gz")
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
    for name, task in (("demo", "target"), ("demo_source", "source")):
        cfg = compose_data(name, [f"data.root={demo_root / task}", "data.demo=null"])
        result = check_dataset(cfg, load_cases(cfg))
        assert result.problems == [] and result.warnings == []


def test_cache_is_reused_and_rebuilt_when_stale(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = (demo_root / "target" / "sub1" / "sub1_img.nii.gz").stat().st_mtime_ns
    assert demo.build_demo(demo_root, seed=0) == demo_root
    assert (demo_root / "target" / "sub1" / "sub1_img.nii.gz").stat().st_mtime_ns == stamp
    assert demo.demo_is_built(demo_root, seed=0) and not demo.demo_is_built(demo_root, seed=1)
    monkeypatch.setattr(demo, "DEMO_VERSION", demo.DEMO_VERSION + 1)
    assert not demo.demo_is_built(demo_root, seed=0)


def test_demo_config_builds_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr("tcurlora_seg.data.layouts.build_demo", lambda root, seed: calls.append((root, seed)))
    cfg = compose_data("demo", [f"data.root={tmp_path / 'cache' / 'target'}"])
    with pytest.raises(UserError):  # nothing was built by the stub, so the root is missing
        load_cases(cfg)
    assert calls == [(tmp_path / "cache", 0)]
    with pytest.raises(UserError, match="task folder"):
        load_cases({**cfg, "root": str(tmp_path / "cache" / "elsewhere")})


def test_demo_never_overwrites_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a demo cache"):
        demo.build_demo(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
