"""Paired bootstrap intervals on data whose answer is known."""

import numpy as np
import pytest

from loki_exp.evaluation.bootstrap import (
    forgetting_avg_ci,
    paired_delta_ci,
    paired_difference_ci,
    significant,
)
from loki_exp.evaluation.scores import forgetting_avg


def test_paired_delta_interval_on_known_data():
    # 100 items, all wrong before; 30 right after: delta 0.3, binomial sd 0.046.
    before = np.zeros(100)
    after = np.r_[np.ones(30), np.zeros(70)]
    low, high = paired_delta_ci(before, after)
    assert 0.2 < low < 0.3 < high < 0.4
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 100), rel=0.15)
    assert significant((low, high))
    # The same again: fixed seed.
    assert paired_delta_ci(before, after) == (low, high)


def test_pairing_removes_the_item_difficulty():
    rng = np.random.default_rng(1)
    difficulty = rng.normal(size=200) * 10  # large between-item spread, shared before/after
    before, after = difficulty, difficulty + 0.5 + rng.normal(size=200) * 0.1
    low, high = paired_delta_ci(before, after)
    assert 0.47 < low < 0.5 < high < 0.53  # unpaired, the spread of 10 would swamp 0.5


def test_no_change_is_not_significant():
    rng = np.random.default_rng(2)
    before = rng.integers(0, 2, 150).astype(float)
    after = before.copy()
    flip = rng.choice(150, 20, replace=False)
    after[flip[:10]] = 1 - after[flip[:10]]  # 10 items flip one way ...
    after[flip[10:]] = before[flip[:10]]     # ... and 10 take their old values
    low, high = paired_difference_ci(before, after)
    assert low < 0 < high and not significant((low, high))


def test_forgetting_avg_interval_brackets_the_score():
    rng = np.random.default_rng(3)
    before = {"a": rng.binomial(1, 0.6, 200).astype(float),
              "b": rng.binomial(1, 0.4, 300).astype(float)}
    after = {"a": np.where(rng.random(200) < 0.2, 0.0, before["a"]), "b": before["b"].copy()}
    point = forgetting_avg({k: v.mean() for k, v in before.items()},
                           {k: v.mean() for k, v in after.items()})
    low, high = forgetting_avg_ci(before, after)
    assert 0 < low < point < high  # benchmark a lost ~20% of its right answers
    # A lower-is-better measure enters with its sign flipped (documented convention).
    low_flipped, high_flipped = forgetting_avg_ci(after, before, signs={"a": -1.0, "b": -1.0})
    assert low_flipped < high_flipped


def test_too_few_items_give_no_interval():
    assert all(np.isnan(paired_delta_ci([1.0], [0.0])))


def test_avg_difference_between_two_runs_on_the_same_items():
    from loki_exp.evaluation.bootstrap import avg_difference_ci

    rng = np.random.default_rng(4)
    before = {"a": rng.binomial(1, 0.7, 300).astype(float)}
    kept = {"a": before["a"].copy()}
    lost = {"a": np.where(rng.random(300) < 0.3, 0.0, before["a"])}  # ~30% of right answers lost
    low, high = avg_difference_ci(before, kept, lost)
    assert 20 < low < 30 < high < 40  # run b forgets ~30% more (relative), run a nothing
    same_low, same_high = avg_difference_ci(before, lost, lost)
    assert same_low == same_high == 0.0


def test_a_mean_over_categories_is_resampled_by_category():
    from loki_exp.evaluation.bootstrap import stratified_delta_ci

    # Two items that all went right in one category, twenty unchanged in the other: the
    # unweighted mean over categories is 0.5 in every resample (pooled items would say 2/22).
    assert stratified_delta_ci({"a": [0.0] * 2, "b": [1.0] * 20},
                               {"a": [1.0] * 2, "b": [1.0] * 20}) == (0.5, 0.5)
    # Half of 50 items gained in a, none of 200 in b: 0.25, half-width 1.96 * sd / 2.
    before = {"a": np.zeros(50), "b": np.zeros(200)}
    after = {"a": np.r_[np.ones(25), np.zeros(25)], "b": np.zeros(200)}
    low, high = stratified_delta_ci(before, after)
    assert low < 0.25 < high
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 50) / 2, rel=0.15)
    with pytest.raises(ValueError, match="paired items of a differ in number"):
        stratified_delta_ci({"a": [0.0, 1.0]}, {"a": [0.0]})


def test_a_category_too_small_to_resample_enters_as_its_fixed_difference():
    from loki_exp.evaluation.bootstrap import stratified_delta_ci

    # One item that went right (+1), an empty category (left out, as from the score), and
    # ten unchanged items: the mean over the two scored categories is 0.5 in every resample.
    assert stratified_delta_ci({"a": [0.0], "b": [], "c": [1.0] * 10},
                               {"a": [1.0], "b": [], "c": [1.0] * 10}) == (0.5, 0.5)
    assert all(np.isnan(stratified_delta_ci({"a": [0.0]}, {"a": [1.0]})))


def test_the_vectorized_statistics_equal_one_call_per_resample_bit_for_bit():
    """scipy calls each statistic once over all 2,000 resamples; each resample's value (and so
    the interval) is the one the per-resample statistic gives, with 13 measures (numpy sums 8
    or more terms pairwise: they are stacked along the last axis, as one array is summed)."""
    from scipy.stats import bootstrap

    from loki_exp.evaluation.bootstrap import (
        LEVEL,
        RESAMPLES,
        SEED,
        avg_difference_ci,
        stratified_delta_ci,
    )

    rng = np.random.default_rng(3)
    names = sorted(f"m{i}" for i in range(13))  # the order the functions resample in
    before = {n: rng.random(rng.integers(3, 40)) + 0.1 for n in names}
    after = {n: v + rng.normal(0, 0.1, len(v)) for n, v in before.items()}
    other = {n: v + rng.normal(0, 0.1, len(v)) for n, v in before.items()}
    signs = {n: -1.0 if i % 2 else 1.0 for i, n in enumerate(names)}

    def one_call_per_resample(runs, value):
        """The interval as scipy computed it before (vectorized=False): ``value`` gets, per
        measure, the resampled items of each of ``runs``."""
        def statistic(*indices):
            return value([tuple(run[n][i.astype(int)] for run in runs)
                          for n, i in zip(names, indices)])
        res = bootstrap(tuple(np.arange(len(before[n]), dtype=float) for n in names), statistic,
                        vectorized=False, n_resamples=RESAMPLES, confidence_level=LEVEL,
                        method="percentile", random_state=np.random.default_rng(SEED))
        return tuple(float(x) for x in res.confidence_interval)

    def avg(items):
        return 100.0 * float(np.mean([signs[n] * (b.mean() - a.mean()) / b.mean()
                                      for n, (b, a) in zip(names, items)]))

    def avg_difference(items):
        return 100.0 * float(np.mean([signs[n] * (a1.mean() - a2.mean()) / b.mean()
                                      for n, (b, a1, a2) in zip(names, items)]))

    def mean_of_means(items):
        return float(np.mean([a.mean() - b.mean() for b, a in items]))

    assert forgetting_avg_ci(before, after, signs) == one_call_per_resample((before, after), avg)
    assert avg_difference_ci(before, after, other, signs) == one_call_per_resample(
        (before, after, other), avg_difference)
    assert stratified_delta_ci(before, after) == one_call_per_resample((before, after),
                                                                       mean_of_means)
