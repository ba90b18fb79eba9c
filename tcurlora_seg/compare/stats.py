"""How sure a paired difference is: a 95 % interval from a paired bootstrap over test cases x seeds, and a Wilcoxon
signed-rank test over the test cases.

The data are per (seed, case) values of two methods, e.g. the per-case Dice of each run's ``eval/metrics.csv``: the
same test case scored by the runs of the same seed (common random numbers, ``constants.REFERENCE``). Only pairs that
both methods have count, so the difference ``a - b`` is taken within each (seed, case) and whatever a case or a seed
does to both methods alike (a hard case, a lucky data stream) cancels before any resampling.

* The estimate is the mean over seeds of each seed's mean over its cases of ``a - b`` (the tables' Δ: the difference
  of the runs' mean Dice, averaged over seeds).
* The interval is the percentile interval of that estimate over ``RESAMPLES`` bootstrap replicates drawn with a
  fixed generator (``RNG_SEED``), so a table is the same every time it is written. Each replicate draws the seeds
  with replacement and the cases with replacement. When every seed has the same test cases (the usual case: the
  split does not depend on the run's seed) the two draws are crossed, one case draw shared by every seed, since a
  case that is hard at one seed is hard at the others; otherwise the cases are drawn within each drawn seed (nested).
  scipy.stats.bootstrap resamples one level only, hence the two levels by hand.
* The p-value is ``scipy.stats.wilcoxon`` (two-sided) over the cases, one difference per case: its mean over the
  seeds (the seeds of one case are not independent observations of it). Zero differences (both methods scored the
  case the same) are ranked and their ranks dropped (``zero_method="pratt"``): they count as evidence of no
  difference rather than vanish; all-zero differences give p = 1. Ties take average ranks; scipy then computes the
  p-value by exhaustive permutations for up to 13 cases and by the normal approximation above, and exactly for up to
  50 cases without ties or zeros. ``n`` is the number of cases.

A difference is called real only when its interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["CONFIDENCE", "RESAMPLES", "RNG_SEED", "ZERO_METHOD", "PairedDifference", "bootstrap_interval",
           "differences", "paired_difference", "wilcoxon_cases"]

RESAMPLES = 10_000
CONFIDENCE = 0.95
RNG_SEED = 0
ZERO_METHOD = "pratt"

Key = tuple[str, str]  # (seed, case id)


@dataclass(frozen=True)
class PairedDifference:
    """A − B over the paired (seed, case) values: estimate, bootstrap interval, Wilcoxon p-value and counts."""

    mean: float
    low: float
    high: float
    p: float
    n_cases: int  # distinct cases (the Wilcoxon test's n)
    n_seeds: int
    n_zero: int  # cases whose difference (mean over seeds) is exactly 0

    @property
    def real(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low > 0 or self.high < 0


def differences(a: Mapping[Key, float], b: Mapping[Key, float]) -> dict[Key, float]:
    """``a - b`` for every (seed, case) that both have, in sorted key order."""
    return {key: float(a[key]) - float(b[key]) for key in sorted(a.keys() & b.keys())}


def _by_seed(diffs: Mapping[Key, float]) -> dict[str, dict[str, float]]:
    seeds: dict[str, dict[str, float]] = {}
    for (seed, case), value in sorted(diffs.items()):
        seeds.setdefault(seed, {})[case] = value
    return seeds


def _estimate(diffs: Mapping[Key, float]) -> float:
    return float(np.mean([np.mean(list(cases.values())) for cases in _by_seed(diffs).values()]))


def bootstrap_interval(diffs: Mapping[Key, float], resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = RNG_SEED) -> tuple[float, float]:
    """The percentile interval of the estimate over ``resamples`` replicates (seeds and cases drawn with replacement,
    crossed when every seed has the same cases, else nested; see the module docstring)."""
    by_seed = _by_seed(diffs)
    rng = np.random.default_rng(seed)
    columns = [sorted(cases) for cases in by_seed.values()]
    n_seeds = len(by_seed)
    if all(cases == columns[0] for cases in columns):  # crossed: D (seeds, cases)
        d = np.array([[cases[c] for c in columns[0]] for cases in by_seed.values()])
        n_cases = d.shape[1]
        # how often each seed / case is drawn in each replicate: (B, S) and (B, C)
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=resamples)
        case_counts = rng.multinomial(n_cases, np.full(n_cases, 1 / n_cases), size=resamples)
        estimates = np.einsum("bs,sc,bc->b", seed_counts, d, case_counts) / (n_seeds * n_cases)
    else:  # nested: every drawn seed (every slot of a replicate) draws its own cases
        drawn = rng.integers(n_seeds, size=(resamples, n_seeds))  # (B, S) seed of each slot
        means = np.empty((resamples, n_seeds))
        for s, cases in enumerate(by_seed.values()):
            values = np.array(list(cases.values()))
            slots = drawn == s
            means[slots] = values[rng.integers(len(values), size=(int(slots.sum()), len(values)))].mean(axis=1)
        estimates = means.mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return float(low), float(high)


def wilcoxon_cases(diffs: Mapping[Key, float]) -> tuple[float, int, int]:
    """Two-sided Wilcoxon signed-rank p-value over the cases (each case's difference averaged over its seeds), the
    number of cases and how many of them have a zero difference."""
    per_case: dict[str, list[float]] = {}
    for (_, case), value in diffs.items():
        per_case.setdefault(case, []).append(value)
    d = np.array([np.mean(per_case[case]) for case in sorted(per_case)])
    zeros = int((d == 0).sum())
    if zeros == len(d):  # no case differs: nothing to rank (scipy gives NaN above 13 cases)
        return 1.0, len(d), zeros
    return float(stats.wilcoxon(d, zero_method=ZERO_METHOD).pvalue), len(d), zeros


def paired_difference(a: Mapping[Key, float], b: Mapping[Key, float], resamples: int = RESAMPLES,
                      seed: int = RNG_SEED) -> PairedDifference | None:
    """A − B with its bootstrap interval and Wilcoxon p-value over the pairs both have; None with fewer than two
    paired cases (no spread to resample)."""
    diffs = differences(a, b)
    if len({case for _, case in diffs}) < 2:
        return None
    low, high = bootstrap_interval(diffs, resamples, seed=seed)
    p, n_cases, zeros = wilcoxon_cases(diffs)
    return PairedDifference(_estimate(diffs), low, high, p, n_cases, len(_by_seed(diffs)), zeros)
