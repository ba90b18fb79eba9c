"""Dice and HD95 per case, the empty-mask policy, and the summary files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from tcurlora_seg.engine.metrics import case_means, case_metrics, markdown_table, summarize, write_metrics_csv
from tcurlora_seg.errors import UserError

SPACING = (0.8, 1.3, 2.5)  # anisotropic on purpose: voxels and mm give different answers


def hd95_reference(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """Independent HD95: surfaces by erosion, distances in mm by an EDT, 95th percentile per direction, the max."""

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask)

    s_pred, s_ref = surface(pred), surface(ref)
    pred_to_ref = ndimage.distance_transform_edt(~s_ref, sampling=spacing)[s_pred]
    ref_to_pred = ndimage.distance_transform_edt(~s_pred, sampling=spacing)[s_ref]
    return max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))


def box(shape, *slices):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[slices] = 1
    return mask


def test_hd95_matches_an_independent_computation_in_mm():
    rng = np.random.default_rng(0)
    label = box((20, 24, 16), slice(4, 14), slice(5, 18), slice(3, 11))
    pred = ndimage.binary_dilation(label, iterations=1) ^ (rng.random(label.shape) < 0.05)  # noisy, with outliers
    result = case_metrics(pred.astype(np.uint8), label, SPACING, 2)["metrics"]["1"]
    expected = hd95_reference(pred.astype(bool), label.astype(bool), SPACING)
    assert result["HD95"] == pytest.approx(expected, rel=1e-5)
    # the spacing matters: the same masks measured in voxels give another number
    assert result["HD95"] != pytest.approx(hd95_reference(pred.astype(bool), label.astype(bool), (1, 1, 1)), rel=1e-3)


def test_hd95_is_the_larger_of_the_two_directed_percentiles():
    label = box((30, 30, 12), slice(5, 15), slice(5, 15), slice(2, 8))
    pred = label.copy()
    pred[25:29, 22:29, 2:8] = 1  # a far-away false positive: large pred->ref distances, ref->pred stays 0
    result = case_metrics(pred, label, SPACING, 2)["metrics"]["1"]["HD95"]
    assert result == pytest.approx(hd95_reference(pred.astype(bool), label.astype(bool), SPACING), rel=1e-5)
    assert result > 10.0  # ref->pred alone would be 0 mm


def test_dice_by_hand():
    label = box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))  # 64 voxels
    pred = box((10, 10, 10), slice(3, 7), slice(2, 6), slice(2, 6))  # shifted by one: 48 shared voxels
    m = case_metrics(torch.from_numpy(pred)[None], label, (1, 1, 1), 2, case_id="sub1")
    assert m["id"] == "sub1"
    assert m["metrics"]["1"]["Dice"] == pytest.approx(200 * 48 / 128)  # 75 %
    assert (m["metrics"]["1"]["n_pred"], m["metrics"]["1"]["n_ref"], m["metrics"]["1"]["empty"]) == (64, 64, None)
    assert m["metrics"]["1"]["HD95"] == pytest.approx(1.0)


def test_empty_mask_policy():
    shape, spacing = (10, 12, 8), (1.0, 2.0, 3.0)
    diagonal = math.sqrt(10**2 + 24**2 + 24**2)
    empty, some = np.zeros(shape, np.uint8), box(shape, slice(2, 5), slice(2, 5), slice(2, 5))
    both = case_metrics(empty, empty, spacing, 2)["metrics"]["1"]
    assert (both["Dice"], both["HD95"], both["empty"]) == (100.0, 0.0, "both")
    missed = case_metrics(empty, some, spacing, 2)["metrics"]["1"]
    assert (missed["Dice"], missed["empty"]) == (0.0, "prediction")
    assert missed["HD95"] == pytest.approx(diagonal) and math.isfinite(missed["HD95"])
    spurious = case_metrics(some, empty, spacing, 2)["metrics"]["1"]
    assert (spurious["Dice"], spurious["HD95"], spurious["empty"]) == (0.0, pytest.approx(diagonal), "reference")


def test_every_foreground_class_is_scored():
    label = box((10, 10, 10), slice(0, 4), slice(0, 4), slice(0, 4))
    label[6:9, 6:9, 6:9] = 2
    m = case_metrics(label, label, (1, 1, 1), 4)["metrics"]
    assert sorted(m) == ["1", "2", "3"]
    assert m["1"]["Dice"] == m["2"]["Dice"] == 100.0 and m["3"]["empty"] == "both"


@pytest.mark.parametrize(
    ("pred", "label", "spacing", "match"),
    [
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), (1, 1, 1), "resample"),
        (np.full((4, 4, 4), 4, np.uint8), np.zeros((4, 4, 4), np.uint8), (1, 1, 1), "num_classes"),
        (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (1, -1, 1), "spacing"),
    ],
)
def test_bad_inputs_are_user_errors(pred, label, spacing, match):
    with pytest.raises(UserError, match=match):
        case_metrics(pred, label, spacing, 2, case_id="sub9")


def two_cases():
    label = box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))
    shifted = box((10, 10, 10), slice(3, 7), slice(2, 6), slice(2, 6))
    return [
        case_metrics(shifted, label, (1, 1, 1), 2, case_id="a"),  # Dice 75, HD95 1
        case_metrics(np.zeros_like(label), label, (1, 1, 1), 2, case_id="b"),  # missed: Dice 0, HD95 = diagonal
    ]


def test_summary_follows_nnunet_layout_with_hd95_and_definitions():
    per_case = two_cases()
    summary = summarize(per_case, class_names={1: "hippocampus"})
    diagonal = math.sqrt(300)
    assert summary["metric_per_case"] == per_case and summary["n"] == 2
    assert summary["mean"]["1"]["Dice"] == pytest.approx(37.5)
    assert summary["mean"]["1"]["HD95"] == pytest.approx((1 + diagonal) / 2)
    assert summary["std"]["1"]["Dice"] == pytest.approx(37.5)  # population std of (75, 0)
    assert summary["median"]["1"]["Dice"] == pytest.approx(37.5)
    assert summary["foreground_mean"] == pytest.approx({"Dice": 37.5, "HD95": (1 + diagonal) / 2})
    assert summary["empty_cases"]["1"] == {"prediction_empty": 1, "reference_empty": 0, "both_empty": 0}
    assert "95th percentile" in summary["definitions"]["HD95"] and summary["definitions"]["units"]["HD95"] == "mm"
    assert "diagonal" in summary["definitions"]["empty_policy"]
    assert summary["class_names"] == {"1": "hippocampus"}
    json.dumps(summary, allow_nan=False)  # the empty policy keeps every number finite


def test_foreground_mean_averages_the_class_means():
    label = np.zeros((10, 10, 10), np.uint8)
    label[0:4, 0:4, 0:4], label[6:9, 6:9, 6:9] = 1, 2
    pred = label.copy()
    pred[6:9, 6:9, 6:9] = 0  # class 2 missed
    summary = summarize([case_metrics(pred, label, (1, 1, 1), 3)])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(50.0)


def test_csv_has_one_row_per_case(tmp_path):
    write_metrics_csv(tmp_path / "metrics.csv", two_cases())
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "dice_1", "hd95_1", "empty_1"]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert float(rows[0]["dice_1"]) == pytest.approx(75.0) and float(rows[0]["hd95_1"]) == pytest.approx(1.0)
    assert rows[0]["empty_1"] == "" and rows[1]["empty_1"] == "prediction"


def test_markdown_table_shows_mean_std_median_and_empty_count():
    table = markdown_table(summarize(two_cases(), class_names={1: "hippocampus"}))
    lines = table.strip().splitlines()
    assert lines[0].startswith("| class |") and "Dice %" in lines[0] and "HD95 mm" in lines[0]
    assert lines[2] == f"| 1 (hippocampus) | 2 | 37.50 ± 37.50 (37.50) | {(1 + math.sqrt(300)) / 2:.2f} ± " + (
        f"{(math.sqrt(300) - 1) / 2:.2f} ({(1 + math.sqrt(300)) / 2:.2f}) | 1 |"
    )
    assert lines[-1].startswith("| foreground mean | 2 | 37.50 |")


def test_summarize_refuses_no_cases():
    with pytest.raises(UserError, match="no cases"):
        summarize([])


def test_csv_variant_columns_and_case_means_read_back(tmp_path):
    label = np.zeros((10, 10, 10), np.uint8)
    label[0:4, 0:4, 0:4], label[6:9, 6:9, 6:9] = 1, 2
    per_case = [case_metrics(label, label, (1, 1, 1), 3, case_id="a"), case_metrics(np.zeros_like(label), label, (1, 1, 1), 3, case_id="b")]
    variant = list(reversed(per_case))
    with pytest.raises(ValueError, match="other cases"):  # a variant must score the same cases in the same order
        write_metrics_csv(tmp_path / "metrics.csv", per_case, {"cc1000": variant})
    variant = [case_metrics(np.zeros_like(label), label, (1, 1, 1), 3, case_id=c) for c in ("a", "b")]
    write_metrics_csv(tmp_path / "metrics.csv", per_case, {"cc1000": variant})
    with open(tmp_path / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:7] == ["id", "dice_1", "hd95_1", "empty_1", "dice_2", "hd95_2", "empty_2"]
    assert header[7:] == ["dice_cc1000_1", "hd95_cc1000_1", "empty_cc1000_1", "dice_cc1000_2", "hd95_cc1000_2", "empty_cc1000_2"]
    # the foreground mean over both classes, per case; the variant's own columns; nothing for what was not recorded
    assert case_means(tmp_path / "metrics.csv") == {"a": 100.0, "b": 0.0}
    assert case_means(tmp_path / "metrics.csv", variant="cc1000") == {"a": 0.0, "b": 0.0}
    assert case_means(tmp_path / "metrics.csv", "hd95", "cc1000")["a"] == pytest.approx(math.sqrt(300))
    assert case_means(tmp_path / "metrics.csv", variant="cc0") == {} and case_means(tmp_path / "nope.csv") == {}
