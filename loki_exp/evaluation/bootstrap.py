"""Paired bootstrap confidence intervals over evaluation items (scipy.stats.bootstrap).

Every before/after delta is a mean over the same items scored twice, so its interval comes
from resampling items with their (before, after) pair kept together. The Avg forgetting
score combines several benchmarks: each benchmark's items are resampled on their own (paired
within the benchmark, independent across benchmarks), as scipy does for several samples.
A difference between two runs (two methods) on the same items is paired the same way. A
score that is an unweighted mean over categories (BFCL's overall accuracy) is resampled the
same way: each category's items on their own, so every resample keeps the categories' weights.
The seed and the number of resamples are fixed so a report reproduces.

Every statistic is vectorized (scipy's ``vectorized=True``): it takes the resamples stacked
along a leading axis and reduces along the last one, so scipy calls it once instead of 2,000
times. A mean along the last (contiguous) axis sums each row in the order numpy sums one
array, so each resample's value is bit-identical to the per-resample loop it replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import bootstrap

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def _interval(data: tuple, statistic: Callable, paired: bool) -> tuple[float, float]:
    if any(np.asarray(d).shape[-1] < 2 for d in data):
        return float("nan"), float("nan")
    res = bootstrap(data, statistic, paired=paired, vectorized=True, axis=-1,
                    n_resamples=RESAMPLES, confidence_level=LEVEL, method="percentile",
                    random_state=np.random.default_rng(SEED))
    low, high = res.confidence_interval
    return float(low), float(high)


def paired_delta_ci(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """95% interval of mean(after - before) over items scored before and after."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    if before.shape != after.shape:
        raise ValueError(f"paired items differ in number: {before.shape} vs {after.shape}")
    return _interval((before, after), lambda b, a, axis=-1: np.mean(a - b, axis=axis),
                     paired=True)


def forgetting_avg_ci(before: dict[str, Sequence[float]], after: dict[str, Sequence[float]],
                      signs: dict[str, float] | None = None) -> tuple[float, float]:
    """95% interval of the Avg forgetting score (``scores.forgetting_avg``) with each
    benchmark's items resampled as (before, after) pairs, independently across benchmarks."""
    names = sorted(before)
    pairs = [(np.asarray(before[n], float), np.asarray(after[n], float)) for n in names]
    sign = [1.0 if signs is None else signs.get(n, 1.0) for n in names]

    # scipy resamples each sample on its own; resampling item indices (one sample per
    # benchmark) keeps each item's before and after together.
    def avg(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        terms = []
        for s, (b, a), idx in zip(sign, pairs, indices):
            idx = idx.astype(int)
            terms.append(s * (b[idx].mean(-1) - a[idx].mean(-1)) / b[idx].mean(-1))
        return 100.0 * _mean_of(terms)

    return _interval(tuple(np.arange(len(b), dtype=float) for b, _ in pairs), avg, paired=False)


def avg_difference_ci(before: dict[str, Sequence[float]], after_a: dict[str, Sequence[float]],
                      after_b: dict[str, Sequence[float]],
                      signs: dict[str, float] | None = None) -> tuple[float, float]:
    """95% interval of Avg(b) - Avg(a) for two runs scored on the same items (the base
    scores shared): each benchmark's items resampled with all three values together."""
    names = sorted(before)
    rows = [tuple(np.asarray(d[n], float) for d in (before, after_a, after_b)) for n in names]
    sign = [1.0 if signs is None else signs.get(n, 1.0) for n in names]

    def diff(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        terms = []
        for s, (b, a1, a2), idx in zip(sign, rows, indices):
            idx = idx.astype(int)
            terms.append(s * (a1[idx].mean(-1) - a2[idx].mean(-1)) / b[idx].mean(-1))
        return 100.0 * _mean_of(terms)

    return _interval(tuple(np.arange(len(r[0]), dtype=float) for r in rows), diff, paired=False)


def stratified_delta_ci(before: dict[str, Sequence[float]],
                        after: dict[str, Sequence[float]]) -> tuple[float, float]:
    """95% interval of the unweighted mean over strata of mean(after - before), each stratum's
    items resampled as (before, after) pairs on their own. Also the difference of two runs on
    the same items (``before`` = the first run's ``after``). An empty stratum is left out (as
    from the score); a one-item stratum has no spread and enters as its fixed difference."""
    names = [n for n in sorted(before) if len(before[n])]
    pairs = [_pair(n, before[n], after[n]) for n in names]
    fixed = [float(a[0] - b[0]) for b, a in pairs if len(b) == 1]
    varied = [(b, a) for b, a in pairs if len(b) > 1]
    if not varied:
        return float("nan"), float("nan")

    def mean_of_means(*indices: np.ndarray, axis: int = -1) -> np.ndarray:
        means = [a[idx.astype(int)].mean(-1) - b[idx.astype(int)].mean(-1)
                 for (b, a), idx in zip(varied, indices)]
        return _mean_of(means + [np.full_like(means[0], f) for f in fixed])

    return _interval(tuple(np.arange(len(b), dtype=float) for b, _ in varied), mean_of_means,
                     paired=False)


def _mean_of(terms: list[np.ndarray]) -> np.ndarray:
    """The mean over terms of each resample's values (terms stacked along the last axis)."""
    return np.stack(terms, axis=-1).mean(axis=-1)


def _pair(name: str, before: Sequence[float], after: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    b, a = np.asarray(before, float), np.asarray(after, float)
    if b.shape != a.shape:
        raise ValueError(f"paired items of {name} differ in number: {b.shape} vs {a.shape}")
    return b, a


def paired_difference_ci(first: Sequence[float], second: Sequence[float]) -> tuple[float, float]:
    """95% interval of mean(second - first) over the same items scored by two runs."""
    return paired_delta_ci(first, second)


def significant(interval: tuple[float, float]) -> bool:
    low, high = interval
    return bool(low > 0 or high < 0)
