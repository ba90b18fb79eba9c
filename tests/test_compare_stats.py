"""compare.stats: the paired bootstrap interval over cases x seeds and the Wilcoxon test over cases."""

from __future__ import annotations

from dataclasses import astuple

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tcurlora_seg.compare import stats

SEEDS, CASES = ["0", "1", "2"], [f"case{i}" for i in range(10)]


def grid(values: np.ndarray) -> dict[tuple[str, str], float]:
    """(seeds, cases) array -> {(seed, case): value}."""
    return {(s, c): float(values[i, j]) for i, s in enumerate(SEEDS) for j, c in enumerate(CASES)}


@pytest.fixture
def hard_and_easy_cases() -> np.ndarray:
    """Reference Dice per (seed, case): cases from 20 to 90 %, the seeds a few points apart."""
    rng = np.random.default_rng(1)
    return rng.uniform(20, 90, size=len(CASES))[None, :] + rng.normal(0, 3, size=(len(SEEDS), 1))


def test_a_steady_gain_gives_an_interval_above_zero(hard_and_easy_cases):
    rng = np.random.default_rng(2)
    b = hard_and_easy_cases
    a = b + 1.0 + rng.normal(0, 0.3, size=b.shape)  # +1 point on every case, far below the 70-point case spread
    result = stats.paired_difference(grid(a), grid(b))
    assert result.real and 0.7 < result.low < result.mean < result.high < 1.3
    assert result.mean == pytest.approx((a - b).mean())
    assert result.p < 0.01 and (result.n_cases, result.n_seeds, result.n_zero) == (10, 3, 0)


def test_a_difference_that_changes_sign_gives_an_interval_around_zero(hard_and_easy_cases):
    b = hard_and_easy_cases
    a = b + np.where(np.arange(len(CASES)) % 2, 2.0, -2.0)[None, :]  # ±2 points, alternating cases: no net effect
    result = stats.paired_difference(grid(a), grid(b))
    assert result.low < 0 < result.high and not result.real
    assert result.mean == pytest.approx(0.0, abs=1e-9) and result.p > 0.5


def test_a_shift_common_to_both_methods_on_each_case_cancels(hard_and_easy_cases):
    rng = np.random.default_rng(3)
    b = hard_and_easy_cases
    a = b + 0.5 + rng.normal(0, 1.0, size=b.shape)
    shift = rng.normal(0, 30, size=b.shape)  # a large per-(seed, case) effect that both methods share
    shifted, plain = stats.paired_difference(grid(a + shift), grid(b + shift)), stats.paired_difference(grid(a), grid(b))
    assert astuple(shifted) == pytest.approx(astuple(plain), abs=1e-9)  # (up to round-off of a - b)
    assert plain.high - plain.low < 2.0  # the cases' 70-point spread is not in it
    # pairs are matched by (seed, case), not by order; unpaired values are left out
    b_swapped = dict(reversed(list(grid(b).items())))
    extra = {**grid(a), ("9", "case0"): 99.0}
    assert stats.paired_difference(extra, b_swapped) == stats.paired_difference(grid(a), grid(b))


def test_wilcoxon_agrees_with_scipy_on_the_per_case_seed_means():
    a = {("0", "x"): 80.0, ("0", "y"): 70.0, ("0", "z"): 60.0, ("0", "w"): 50.0, ("0", "v"): 40.0, ("0", "u"): 30.0,
         ("1", "x"): 82.0, ("1", "y"): 69.0, ("1", "z"): 63.0, ("1", "w"): 50.0, ("1", "v"): 41.0, ("1", "u"): 35.0}
    b = {("0", "x"): 79.0, ("0", "y"): 71.0, ("0", "z"): 58.0, ("0", "w"): 51.0, ("0", "v"): 39.0, ("0", "u"): 30.0,
         ("1", "x"): 80.0, ("1", "y"): 69.0, ("1", "z"): 61.0, ("1", "w"): 49.0, ("1", "v"): 41.0, ("1", "u"): 31.0}
    # per case, the mean over the two seeds of a - b (u, v, w, x, y, z): a zero (w) and ties (|v| = |y|, u = z)
    per_case = [2.0, 0.5, 0.0, 1.5, -0.5, 2.0]
    p, n, zeros = stats.wilcoxon_cases(stats.differences(a, b))
    assert (n, zeros) == (6, 1)
    assert p == pytest.approx(scipy_stats.wilcoxon(per_case, zero_method="pratt").pvalue)
    assert stats.wilcoxon_cases({("0", "x"): 0.0, ("0", "y"): 0.0})[0] == 1.0
    # above 13 cases scipy's normal approximation: there the zeros' handling changes the p-value
    many = [1.0, 2.0, -0.5, 3.0, 0.0, 0.0, 0.0, 1.5, 2.5, -1.0, 4.0, 0.5, 0.0, 1.0, 2.0, 3.5]
    p, n, zeros = stats.wilcoxon_cases({("0", f"c{i:02d}"): d for i, d in enumerate(many)})
    assert (n, zeros) == (16, 4) and p == pytest.approx(scipy_stats.wilcoxon(many, zero_method="pratt").pvalue)
    assert p != pytest.approx(scipy_stats.wilcoxon(many).pvalue)  # zeros ranked (Pratt), not dropped (scipy's default)


def test_the_interval_is_reproducible_and_fixed_by_the_generator_seed(hard_and_easy_cases):
    rng = np.random.default_rng(4)
    a, b = grid(hard_and_easy_cases + rng.normal(0, 2, size=hard_and_easy_cases.shape)), grid(hard_and_easy_cases)
    first = stats.paired_difference(a, b)
    assert stats.paired_difference(a, b) == first
    other = stats.paired_difference(a, b, seed=stats.RNG_SEED + 1)
    assert (other.low, other.high) != (first.low, first.high) and other.mean == first.mean


def test_seeds_with_other_test_cases_are_resampled_within_each_seed():
    a = {("0", "a"): 3.0, ("0", "b"): 1.0, ("1", "c"): 5.0, ("1", "d"): 7.0, ("1", "e"): 6.0}
    b = dict.fromkeys(a, 0.0)
    result = stats.paired_difference(a, b)
    assert result.mean == pytest.approx((2.0 + 6.0) / 2)  # the mean of the seeds' means
    assert 1.0 <= result.low < result.mean < result.high <= 7.0 and result.n_cases == 5
    # one seed whose cases all differ by the same amount: no spread, the interval is that value
    constant = stats.paired_difference({("0", "a"): 2.0, ("0", "b"): 2.0}, {("0", "a"): 0.0, ("0", "b"): 0.0})
    assert (constant.low, constant.high) == pytest.approx((2.0, 2.0)) and constant.real


def test_fewer_than_two_paired_cases_give_no_interval():
    assert stats.paired_difference({("0", "a"): 1.0, ("1", "a"): 2.0}, {("0", "a"): 0.0, ("1", "a"): 0.0}) is None
    assert stats.paired_difference({("0", "a"): 1.0}, {("1", "a"): 0.0}) is None
