"""Evaluation of a fabricated run (tiny UNETR, 32³): files and values, checkpoint averaging, grids and affines."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tcurlora_seg.adapters import adapter_layers
from tcurlora_seg.engine.evaluate import evaluate_run, load_reference, scores_at
from tcurlora_seg.engine.inference import Segmenter, select_checkpoints
from tcurlora_seg.engine.metrics import case_metrics
from tcurlora_seg.engine.postprocess import remove_small_components
from tcurlora_seg.errors import UserError
from tests.run_helpers import AFFINE, make_dataset, make_run, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds"), {"train": [1], "test": [2, 3]})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), dataset)


@pytest.fixture(scope="module")
def two_models(run: Path) -> Segmenter:
    return Segmenter.from_run(run, ["epoch_0001", "epoch_0002"], device="cpu")


def test_evaluate_run_writes_metrics_summary_and_predictions(run: Path, dataset: Path, capsys: pytest.CaptureFixture) -> None:
    summary = evaluate_run(run, progress=False, device="cpu")

    assert summary["n"] == 2
    for case in summary["metric_per_case"]:
        m = case["metrics"]["1"]
        assert 0.0 <= m["Dice"] <= 100.0 and math.isfinite(m["HD95"]) and m["HD95"] >= 0
    settings = summary["evaluation"]
    assert settings["n_cases"] == 2 and settings["split"] == "test" and settings["overlap"] == 0.5
    assert settings["average_last"] == 1 and settings["min_component_mm3"] == 0.0
    assert [c["checkpoint"] for c in settings["checkpoints"]] == ["best"]
    assert json.loads((run / "eval" / "summary.json").read_text())["evaluation"] == settings
    with open(run / "eval" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["sub2", "sub3"] and all(0 <= float(r["dice_1"]) <= 100 for r in rows)
    assert "| foreground mean | 2 |" in capsys.readouterr().out

    for case in ("sub2", "sub3"):
        pred = nib.load(run / "eval" / "predictions" / f"{case}.nii.gz")
        label = nib.load(dataset / case / f"{case}_mask.nii.gz")
        image = nib.load(dataset / case / f"{case}_img.nii.gz")
        assert pred.shape == label.shape
        assert np.allclose(pred.affine, image.affine)
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_average_of_checkpoints_is_mean_of_individual_softmaxes(two_models: Segmenter, dataset: Path) -> None:
    image = two_models.preprocess(str(dataset / "sub2" / "sub2_img.nii.gz"))
    singles = [dataclasses.replace(two_models, models=[m]).probabilities(image) for m in two_models.models]

    averaged = two_models.probabilities(image)
    assert averaged.shape == (2, *image.shape[1:])
    assert not torch.allclose(singles[0], singles[1], atol=1e-4)  # the two checkpoints really differ
    torch.testing.assert_close(averaged.as_tensor(), (singles[0].as_tensor() + singles[1].as_tensor()) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(averaged.sum(0), torch.ones(image.shape[1:]), rtol=0, atol=1e-5)


def test_models_are_merged_and_in_eval_mode(two_models: Segmenter) -> None:
    assert [c["checkpoint"] for c in two_models.checkpoints] == ["epoch_0001", "epoch_0002"]
    for model in two_models.models:
        layers = adapter_layers(model)
        assert layers and all(layer.merged for layer in layers)
        assert not model.training


def test_average_last_selects_the_last_epoch_checkpoints(run: Path) -> None:
    assert select_checkpoints(run, "last", 1) == ["last"]
    assert select_checkpoints(run, "best", None) == ["best"]
    assert select_checkpoints(run, "best", 2) == ["epoch_0001", "epoch_0002"]
    with pytest.raises(UserError, match="average_last=4"):
        select_checkpoints(run, "best", 4)
    with pytest.raises(UserError, match="average_last"):
        select_checkpoints(run, "best", 0)


def test_evaluate_run_with_average_last_records_the_checkpoints(run: Path) -> None:
    summary = evaluate_run(run, average_last=2, min_component_mm3=50, save_predictions=False, progress=False, device="cpu")
    settings = summary["evaluation"]
    assert [c["checkpoint"] for c in settings["checkpoints"]] == ["epoch_0001", "epoch_0002"]
    assert settings["average_last"] == 2 and settings["min_component_mm3"] == 50.0


def test_empty_split_names_data_split(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", {"train": [1], "val": [2]})
    run = make_run(tmp_path / "run", data, epochs=())
    with pytest.raises(UserError, match=r"data\.split.*no test cases"):
        evaluate_run(run, progress=False, device="cpu")


def test_bad_settings_are_user_errors(run: Path) -> None:
    with pytest.raises(UserError, match="overlap"):
        evaluate_run(run, overlap=1.5, progress=False, device="cpu")
    with pytest.raises(UserError, match="split='dev'"):
        evaluate_run(run, split="dev", progress=False, device="cpu")
    with pytest.raises(UserError, match="checkpoint"):
        evaluate_run(run, checkpoint="epoch_0042", progress=False, device="cpu")
    with pytest.raises(UserError, match="run_dir"):
        evaluate_run(run / "nope", progress=False)


def test_resampled_run_is_scored_on_the_label_grid(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", {"train": [1], "test": [2]})
    run = make_run(tmp_path / "run", data, overrides=["data.orientation=RAS", "data.spacing=[3.0,3.0,3.0]"], epochs=())
    summary = evaluate_run(run, progress=False, device="cpu")
    assert summary["n"] == 1
    pred = nib.load(run / "eval" / "predictions" / "sub2.nii.gz")
    label = nib.load(data / "sub2" / "sub2_mask.nii.gz")
    assert pred.shape == label.shape and np.allclose(pred.affine, AFFINE)


def test_inversion_restores_the_file_grid_exactly(tmp_path: Path) -> None:
    """One-hot of the reoriented label, inverted, is the label file as stored (RAS flips and permutes AFFINE's axes)."""
    data = make_dataset(tmp_path / "ds", {"train": [1], "test": [2]})
    run = make_run(tmp_path / "run", data, overrides=["data.orientation=RAS", "data.spacing=[2.0,2.0,2.0]"], epochs=())
    segmenter = Segmenter.from_run(run, ["best"], device="cpu")
    files = {"image": str(data / "sub2" / "sub2_img.nii.gz"), "label": str(data / "sub2" / "sub2_mask.nii.gz")}
    moved = segmenter.transform(files)
    image, label = moved["image"], moved["label"]
    stored, spacing = load_reference(files["label"], {})
    assert label.shape[1:] != stored.shape  # the model grid is not the file grid

    onehot = torch.cat([label == 0, label == 1]).float()
    prob = MetaTensor(onehot, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    back = segmenter.to_input_grid(prob, image)
    np.testing.assert_array_equal(segmenter.postprocess(back, spacing), stored)


def test_postprocess_removes_components_below_the_volume(two_models: Segmenter) -> None:
    segmenter = dataclasses.replace(two_models, min_component_mm3=60.0)
    fg = torch.zeros(10, 10, 10)
    fg[0:2, 0:2, 0:2] = 1  # 8 voxels * 8 mm³ = 64 mm³: kept
    fg[6, 6, 6:8] = 1  # 2 voxels = 16 mm³: removed
    prob = torch.stack([1 - fg, fg])
    mask = segmenter.postprocess(prob, (2.0, 2.0, 2.0))
    assert mask.dtype == np.uint8 and mask.sum() == 8 and mask[6, 6, 6] == 0


def test_one_inference_pass_scores_hd95_with_and_without_the_1cm3_removal(run: Path, dataset: Path, tmp_path: Path) -> None:
    """The protocol's masks, and from the same argmax the two definitions the comparison reports: all components
    (cc0) and components < 1000 mm³ removed (cc1000); whichever the protocol is, the other goes beside it."""
    plain = evaluate_run(run, out_dir=tmp_path / "plain", figures=False, progress=False, device="cpu")
    paper = evaluate_run(run, min_component_mm3=1000, out_dir=tmp_path / "paper", save_predictions=False, figures=False,
                         progress=False, device="cpu")
    assert list(plain["component_variants"]) == ["cc1000"] and list(paper["component_variants"]) == ["cc0"]
    rows = {}
    for name in ("plain", "paper"):
        with open(tmp_path / name / "metrics.csv") as f:
            rows[name] = list(csv.DictReader(f))
    assert list(rows["plain"][0]) == ["id", "dice_1", "hd95_1", "empty_1", "dice_cc1000_1", "hd95_cc1000_1", "empty_cc1000_1"]
    changed = False
    for row, other in zip(rows["plain"], rows["paper"]):
        raw = np.asarray(nib.load(tmp_path / "plain" / "predictions" / f"{row['id']}.nii.gz").dataobj)
        reference, spacing = load_reference(dataset / row["id"] / f"{row['id']}_mask.nii.gz", {})
        expected = case_metrics(remove_small_components(raw, spacing, 1000.0), reference, spacing, 2)["metrics"]["1"]
        assert float(row["hd95_cc1000_1"]) == pytest.approx(expected["HD95"]) and float(row["dice_cc1000_1"]) == pytest.approx(expected["Dice"])
        # the paper's protocol scores the same masks as the plain run's cc1000 columns, and its cc0 the plain ones
        assert (other["dice_1"], other["hd95_1"]) == (row["dice_cc1000_1"], row["hd95_cc1000_1"])
        assert (other["dice_cc0_1"], other["hd95_cc0_1"]) == (row["dice_1"], row["hd95_1"])
        changed |= row["dice_1"] != row["dice_cc1000_1"]
    assert changed  # the removal took components away here (the masks differ)
    assert scores_at(plain, 1000.0) == (paper["foreground_mean"], "cc1000")
    assert scores_at(paper, 0.0) == (plain["foreground_mean"], "cc0") and scores_at(plain, 0.0) == (plain["foreground_mean"], None)
    assert scores_at(plain, 50.0) is None and scores_at({"foreground_mean": {"Dice": 1.0}}, 0.0)[1] is None
