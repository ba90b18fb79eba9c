"""The nnU-Net v2 reference (compare/nnunet.py, scripts/nnunet_reference.py): the export to nnU-Net's raw format,
the scoring by our metrics and the run folder that compare's tables read need no nnU-Net; the real pipeline (plan,
train, predict) runs only where nnunetv2 is installed (``pip install -e '.[nnunet]'``, slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tcurlora_seg.compare import nnunet, tables
from tcurlora_seg.compare.collect import collect_run
from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.engine.metrics import case_metrics
from tcurlora_seg.errors import UserError
from tests.conftest import write_official_dataset

REPO = Path(__file__).resolve().parents[1]


def toy_config(root: Path, *overrides: str):
    return nnunet.experiment_config("demo", 0, ["data=official", f"data.root={root}", *overrides])


def data_of(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.data, resolve=True)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_export_writes_training_cases_and_test_images_in_nnunet_raw_format(tmp_path):
    root = write_official_dataset(tmp_path / "toy")  # sub1-3 train, sub4 val, sub5-6 test
    cfg_data = data_of(toy_config(root))
    folder = nnunet.export_dataset(load_cases(cfg_data), cfg_data, tmp_path / "raw")
    assert folder == tmp_path / "raw" / "Dataset501_toy"
    assert names(folder / "imagesTr") == {f"sub{i}_0000.nii.gz" for i in (1, 2, 3)}
    assert names(folder / "labelsTr") == {f"sub{i}.nii.gz" for i in (1, 2, 3)}
    assert names(folder / "imagesTs") == {"sub5_0000.nii.gz", "sub6_0000.nii.gz"}  # no validation case anywhere
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "class_1": 1}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    # images as stored; labels on the same grid, the same voxels
    assert (folder / "imagesTr" / "sub2_0000.nii.gz").read_bytes() == (root / "sub2" / "sub2_img.nii.gz").read_bytes()
    label, original = nib.load(folder / "labelsTr" / "sub2.nii.gz"), nib.load(root / "sub2" / "sub2_mask.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(label.dataobj), np.asanyarray(original.dataobj))
    np.testing.assert_allclose(label.affine, original.affine)


def test_export_applies_the_label_map_so_classes_match_ours(tmp_path):
    root = write_official_dataset(tmp_path / "toy")
    for i in range(1, 7):  # the structure is stored as 4, next to a structure 2 that the runs treat as background
        path = root / f"sub{i}" / f"sub{i}_mask.nii.gz"
        mask = np.asanyarray(nib.load(path).dataobj).astype(np.uint8) * 4
        mask[:3] = 2
        nib.save(nib.Nifti1Image(mask, nib.load(path).affine), path)
    cfg_data = data_of(toy_config(root, "data.labels=[0,2,4]", "+data.label_map={4: 1}"))
    folder = nnunet.export_dataset(load_cases(cfg_data), cfg_data, tmp_path / "raw")
    exported = np.asanyarray(nib.load(folder / "labelsTr" / "sub1.nii.gz").dataobj)
    stored = np.asanyarray(nib.load(root / "sub1" / "sub1_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(exported, (stored == 4).astype(np.uint8))
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "class_1": 1}


def test_export_refuses_label_values_outside_the_classes(tmp_path):
    root = write_official_dataset(tmp_path / "toy")
    path = root / "sub2" / "sub2_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(path).dataobj) * 3, nib.load(path).affine), path)
    cfg_data = data_of(toy_config(root, "data.labels=null"))
    with pytest.raises(UserError, match=r"sub2_mask.nii.gz: label values \[3\].*data.label_map"):
        nnunet.export_dataset(load_cases(cfg_data), cfg_data, tmp_path / "raw")


def test_export_splits_a_4d_image_into_channel_files(tmp_path):
    root = write_official_dataset(tmp_path / "toy")
    for i in range(1, 7):
        path = root / f"sub{i}" / f"sub{i}_img.nii.gz"
        image = nib.load(path)
        volume = np.asanyarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.stack([volume, -volume], axis=-1), image.affine), path)
    cfg_data = data_of(toy_config(root, "data.in_channels=2"))
    folder = nnunet.export_dataset(load_cases(cfg_data), cfg_data, tmp_path / "raw")
    assert names(folder / "imagesTs") == {f"sub{i}_{c:04d}.nii.gz" for i in (5, 6) for c in (0, 1)}
    second = np.asanyarray(nib.load(folder / "imagesTr" / "sub1_0001.nii.gz").dataobj)
    np.testing.assert_allclose(second, -np.asanyarray(nib.load(root / "sub1" / "sub1_img.nii.gz").dataobj)[..., 0])
    assert json.loads((folder / "dataset.json").read_text())["channel_names"] == {"0": "MRI", "1": "MRI"}
    with pytest.raises(UserError, match="2 image channels but data.in_channels=1"):
        nnunet.export_dataset(load_cases(cfg_data), {**cfg_data, "in_channels": 1}, tmp_path / "raw")


def write_predictions(folder: Path, cases: list[dict], kinds: list[str]) -> None:
    """perfect: the label itself; shifted: the label moved by 2 voxels; empty: nothing; speck: the label plus one
    far-off voxel (a component that min_component_mm3 removes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for case, kind in zip(cases, kinds):
        label = nib.load(case["label"])
        mask = np.asanyarray(label.dataobj).astype(np.uint8)
        mask = {"perfect": mask, "shifted": np.roll(mask, 2, axis=0), "empty": np.zeros_like(mask)}.get(kind, mask)
        if kind == "speck":
            mask = mask.copy()
            mask[-1, -1, -1] = 1
        nib.save(nib.Nifti1Image(mask, label.affine), folder / f"{case['id']}.nii.gz")


def test_predictions_are_scored_by_our_metrics_per_test_case(tmp_path):
    root = write_official_dataset(tmp_path / "toy", n=7)  # test: sub5, sub6, sub7
    cfg_data = data_of(toy_config(root))
    test = load_cases(cfg_data)["test"]
    write_predictions(tmp_path / "pred", test, ["perfect", "shifted", "empty"])
    summary = nnunet.evaluate_predictions(tmp_path / "pred", test, cfg_data, tmp_path / "eval")
    rows = read_csv(tmp_path / "eval" / "metrics.csv")
    assert [r["id"] for r in rows] == ["sub5", "sub6", "sub7"]
    assert list(rows[0]) == ["id", "dice_1", "hd95_1", "empty_1"]  # a run's eval/metrics.csv
    label = np.asanyarray(nib.load(test[1]["label"]).dataobj)
    expected = case_metrics(np.roll(label, 2, axis=0), label, (1.5, 1.5, 2.0), 2)["metrics"]["1"]
    assert float(rows[1]["dice_1"]) == pytest.approx(expected["Dice"]) and 0 < expected["Dice"] < 100
    assert float(rows[1]["hd95_1"]) == pytest.approx(expected["HD95"])
    assert float(rows[0]["dice_1"]) == 100 and rows[2]["empty_1"] == "prediction" and float(rows[2]["dice_1"]) == 0
    assert summary["foreground_mean"]["Dice"] == pytest.approx(np.mean([float(r["dice_1"]) for r in rows]))
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["n"] == 3
    assert names(tmp_path / "eval" / "predictions") == {"sub5.nii.gz", "sub6.nii.gz", "sub7.nii.gz"}


def test_scoring_removes_small_components_as_the_runs_protocol_does(tmp_path):
    root = write_official_dataset(tmp_path / "toy")
    cfg_data = data_of(toy_config(root))
    test = load_cases(cfg_data)["test"]
    write_predictions(tmp_path / "pred", test, ["speck", "speck"])
    kept = nnunet.evaluate_predictions(tmp_path / "pred", test, cfg_data, tmp_path / "kept")
    removed = nnunet.evaluate_predictions(tmp_path / "pred", test, cfg_data, tmp_path / "removed", min_component_mm3=10)
    assert kept["foreground_mean"]["Dice"] < 100
    assert removed["foreground_mean"]["Dice"] == 100 and removed["evaluation"]["min_component_mm3"] == 10


def test_a_missing_prediction_names_the_case(tmp_path):
    root = write_official_dataset(tmp_path / "toy")
    cfg_data = data_of(toy_config(root))
    test = load_cases(cfg_data)["test"]
    write_predictions(tmp_path / "pred", test[:1], ["perfect"])
    with pytest.raises(UserError, match="no prediction for test case sub6"):
        nnunet.evaluate_predictions(tmp_path / "pred", test, cfg_data, tmp_path / "eval")


def test_budgets_state_the_trainer_and_counts():
    assert nnunet.budget_for("gpu") == nnunet.Budget("gpu", "nnUNetTrainer", 1000, 250, 50, "cuda", True)
    cpu = nnunet.budget_for("cpu")
    assert cpu.trainer == "nnUNetTrainerBudget" and cpu.device == "cpu" and not cpu.mirroring
    custom = nnunet.budget_for("gpu", epochs=20)
    assert (custom.trainer, custom.epochs, custom.iterations_per_epoch, custom.name) == ("nnUNetTrainerBudget", 20, 250, "gpu-custom")
    with pytest.raises(UserError, match="--epochs 0"):
        nnunet.budget_for("cpu", epochs=0)
    with pytest.raises(UserError, match="--budget tpu"):
        nnunet.budget_for("tpu")


@pytest.fixture
def fake_nnunet(monkeypatch):
    """nnU-Net's child process replaced by one that predicts each test case's label shifted by ``seed`` voxels (so
    seeds differ) and reports its stats; records the calls."""
    calls = []

    def run(run_dir, budget, seed, predict, python, processes):
        calls.append({"run_dir": run_dir, "budget": budget, "seed": seed, "predict": predict})
        split = json.loads((run_dir / "split.json").read_text())
        out = run_dir / "nnunet" / "predictions"
        out.mkdir(parents=True)
        for case in split["test"]:
            label = nib.load(case["label"])
            mask = np.roll(np.asanyarray(label.dataobj).astype(np.uint8), seed, axis=0)
            nib.save(nib.Nifti1Image(mask, label.affine), out / f"{case['id']}.nii.gz")
        return {"trainable": 1234, "step_time_s": 0.5, "timed_steps": 3, "peak_memory_mb": 100.0, "device": budget.device,
                "trainer": budget.trainer, "epochs": budget.epochs, "iterations_per_epoch": budget.iterations_per_epoch,
                "val_iterations_per_epoch": budget.val_iterations_per_epoch, "train_s": 7.0, "plan_and_preprocess_s": 1.0,
                "predict_s": 2.0, "patch_size": [32, 32, 32], "batch_size": 2, "spacing": [1.5, 1.5, 2.0],
                "mirroring": budget.mirroring, "torch_threads": 1, "nnunetv2": "fake", "torch": "fake"}

    monkeypatch.setattr(nnunet, "_run_nnunet", run)
    return calls


def test_reference_runs_become_nnunet_rows_of_the_comparison(tmp_path, fake_nnunet, capsys):
    root = write_official_dataset(tmp_path / "toy")
    out = tmp_path / "compare"
    budget = nnunet.budget_for("cpu")
    for seed in (0, 1):
        cfg = nnunet.experiment_config("demo", seed, ["data=official", f"data.root={root}"])
        nnunet.reference_run(cfg, out / "runs" / "nnunet" / f"seed_{seed}", budget, source="test")
    # the exported dataset holds the split's training cases; the child was asked for exactly the test cases
    assert sorted(fake_nnunet[0]["predict"]) == ["sub5", "sub6"]
    assert names(out / "runs" / "nnunet" / "seed_0" / "nnunet" / "raw" / "Dataset501_toy" / "labelsTr") == {
        "sub1.nii.gz", "sub2.nii.gz", "sub3.nii.gz"}
    row = collect_run(out / "runs" / "nnunet" / "seed_1")
    assert (row["method"], row["setting"], row["seed"], row["trainable"], row["step_time_s"]) == ("nnunet", "nnunet", 1, 1234, 0.5)
    assert 0 < row["dice"] < 100 and row["val_dice"] is None and row["adapter_lr"] is None
    stats = json.loads((out / "runs" / "nnunet" / "seed_0" / "train_stats.json").read_text())
    assert (stats["trainer"], stats["epochs"], stats["train_s"], stats["shots"]) == ("nnUNetTrainerBudget", budget.epochs, 7.0, 3)

    tables.report(out)
    rows = read_csv(out / "comparison.csv")
    assert [(r["method"], r["seed"]) for r in rows] == [("nnunet", "0"), ("nnunet", "1")]
    assert float(rows[0]["dice"]) == 100 and float(rows[1]["dice"]) < 100  # seed 0 predicted the labels unshifted
    assert "| nnunet |" in (out / "comparison.md").read_text()


def test_a_finished_reference_run_is_kept_and_other_settings_rerun(tmp_path, fake_nnunet):
    root = write_official_dataset(tmp_path / "toy")
    cfg = toy_config(root)
    run_dir = tmp_path / "runs" / "nnunet" / "seed_0"
    nnunet.reference_run(cfg, run_dir, nnunet.budget_for("cpu"), source="test")
    nnunet.reference_run(cfg, run_dir, nnunet.budget_for("cpu"), source="test")
    assert len(fake_nnunet) == 1
    nnunet.reference_run(cfg, run_dir, nnunet.budget_for("cpu", epochs=3), source="test")
    assert len(fake_nnunet) == 2
    assert json.loads((run_dir / "train_stats.json").read_text())["epochs"] == 3


def test_a_run_folder_gives_its_own_split_and_seed(tmp_path, fake_nnunet):
    root = write_official_dataset(tmp_path / "toy")
    run = tmp_path / "run"
    run.mkdir()
    cfg = nnunet.experiment_config("demo", 2, ["data=official", f"data.root={root}"])
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, run / "config.yaml")
    cases = load_cases(data_of(cfg))
    (run / "split.json").write_text(json.dumps({"train": cases["train"][:2], "val": [], "test": cases["test"][1:]}))
    loaded = nnunet.run_folder_config(run)
    assert loaded.seed == 2
    nnunet.reference_run(loaded, tmp_path / "ref", nnunet.budget_for("cpu"), source=f"run {run}")
    assert fake_nnunet[0]["seed"] == 2 and sorted(fake_nnunet[0]["predict"]) == ["sub6"]
    assert json.loads((tmp_path / "ref" / "train_stats.json").read_text())["shots"] == 2
    with pytest.raises(UserError, match="no split.json"):
        (run / "split.json").unlink()
        nnunet.run_folder_config(run)


def test_script_refuses_overrides_with_a_run_folder(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "nnunet_reference.py"), "--run-dir", str(tmp_path),
                             "--out", str(tmp_path / "out"), "--", "data.root=x"], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: overrides after -- apply to --experiment; a --run-dir keeps its own config"]


@pytest.mark.slow
def test_nnunet_trains_on_the_training_cases_and_predicts_the_test_cases(tmp_path):
    """The real nnU-Net: export -> plan -> train (1 epoch of 2 iterations) -> predict -> our metrics, on 32³ cases."""
    pytest.importorskip("nnunetv2")
    root = write_official_dataset(tmp_path / "toy", n=6, shape=(32, 32, 32))
    run_dir = tmp_path / "compare" / "runs" / "nnunet" / "seed_0"
    budget = nnunet.budget_for("cpu", epochs=1, iterations=2, val_iterations=1)
    nnunet.reference_run(toy_config(root), run_dir, budget, source="test")

    raw = run_dir / "nnunet" / "raw" / "Dataset501_toy"
    assert names(raw / "imagesTr") == {"sub1_0000.nii.gz", "sub2_0000.nii.gz", "sub3_0000.nii.gz"}
    assert names(raw / "labelsTr") == {"sub1.nii.gz", "sub2.nii.gz", "sub3.nii.gz"}
    assert json.loads((raw / "dataset.json").read_text())["numTraining"] == 3
    plans = json.loads((run_dir / "nnunet" / "preprocessed" / "Dataset501_toy" / "nnUNetPlans.json").read_text())
    assert "3d_fullres" in plans["configurations"]
    trained = run_dir / "nnunet" / "results" / "Dataset501_toy" / "nnUNetTrainerBudget__nnUNetPlans__3d_fullres" / "fold_all"
    assert (trained / "checkpoint_final.pth").is_file()
    predicted = run_dir / "nnunet" / "predictions"
    assert {p.name for p in predicted.glob("*.nii.gz")} == {"sub5.nii.gz", "sub6.nii.gz"}
    for case in ("sub5", "sub6"):  # on the image's grid (nnU-Net transposes the anisotropic axes and back)
        mask, image = nib.load(predicted / f"{case}.nii.gz"), nib.load(root / case / f"{case}_img.nii.gz")
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    assert [r["id"] for r in read_csv(run_dir / "eval" / "metrics.csv")] == ["sub5", "sub6"]
    stats = json.loads((run_dir / "train_stats.json").read_text())
    assert (stats["trainer"], stats["epochs"], stats["iterations_per_epoch"], stats["device"]) == ("nnUNetTrainerBudget", 1, 2, "cpu")
    assert stats["train_s"] > 0 and stats["timed_steps"] == 1 and stats["trainable"] > 0
    row = collect_run(run_dir)
    assert row["method"] == "nnunet" and 0 <= row["dice"] <= 100


def test_a_shots_sweep_puts_each_k_of_a_seed_in_its_own_folder(tmp_path):
    from tcurlora_seg.compare.nnunet import experiment_config, reference_folder

    plain = experiment_config("demo", 1)
    assert reference_folder(tmp_path, plain) == tmp_path / "runs" / "nnunet" / "seed_1"
    at_5 = experiment_config("demo", 0, ["data.split.shots=5", "data.demo.train=20"])
    assert reference_folder(tmp_path, at_5) == tmp_path / "runs" / "shots_05" / "nnunet" / "seed_0"
    assert reference_folder(tmp_path, plain, shots=20) == tmp_path / "runs" / "shots_20" / "nnunet" / "seed_1"


def test_the_reference_trains_on_the_first_k_cases_of_a_shots_sweep_like_the_methods(tmp_path):
    from omegaconf import OmegaConf

    from tcurlora_seg.compare.nnunet import experiment_config, reference_cases

    root = write_official_dataset(tmp_path / "toy")
    cfg = experiment_config("demo", 0, ["data=official", f"data.root={root}", "data.split.shots=2"])
    cases = reference_cases(OmegaConf.to_container(cfg.data, resolve=True))
    assert [c["id"] for c in cases["train"]] == ["sub1", "sub2"]  # not the whole pool of sub1-3
    assert ([c["id"] for c in cases["val"]], [c["id"] for c in cases["test"]]) == (["sub4"], ["sub5", "sub6"])
