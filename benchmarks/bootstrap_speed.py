"""The bootstrap intervals, vectorized (one call of the statistic over all resamples, as
``evaluation/bootstrap.py`` runs them) against one call per resample (scipy's
``vectorized=False``, as they ran before), on the Avg forgetting interval of a cpu_demo-sized
evaluation: 5 benchmarks x 100 items and 8 bits-per-byte sets x 20. Both sides give the same
interval (asserted); the last line prints the ratio.

    .venv/bin/python benchmarks/bootstrap_speed.py
"""

from __future__ import annotations

import time

import numpy as np
from scipy.stats import bootstrap

from loki_exp.evaluation.bootstrap import LEVEL, RESAMPLES, SEED, forgetting_avg_ci


def one_call_per_resample(before, after, signs) -> tuple[float, float]:
    names = sorted(before)

    def avg(*indices):
        return 100.0 * float(np.mean([
            signs.get(n, 1.0) * (before[n][i.astype(int)].mean() - after[n][i.astype(int)].mean())
            / before[n][i.astype(int)].mean() for n, i in zip(names, indices)]))

    res = bootstrap(tuple(np.arange(len(before[n]), dtype=float) for n in names), avg,
                    vectorized=False, n_resamples=RESAMPLES, confidence_level=LEVEL,
                    method="percentile", random_state=np.random.default_rng(SEED))
    return tuple(float(x) for x in res.confidence_interval)


def main() -> None:
    rng = np.random.default_rng(0)
    sizes = {**{f"bench{i}": 100 for i in range(5)}, **{f"bpb{i}": 20 for i in range(8)}}
    before = {n: rng.random(k) + 0.2 for n, k in sizes.items()}
    after = {n: v + rng.normal(0, 0.05, len(v)) for n, v in before.items()}
    signs = {n: -1.0 for n in sizes if n.startswith("bpb")}
    start = time.perf_counter()
    loop = one_call_per_resample(before, after, signs)
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    vectorized = forgetting_avg_ci(before, after, signs)
    vectorized_s = time.perf_counter() - start
    assert vectorized == loop, (vectorized, loop)
    print(f"per_resample_s={loop_s:.3f} vectorized_s={vectorized_s:.3f} "
          f"bootstrap_speedup={loop_s / vectorized_s:.1f}")


if __name__ == "__main__":
    main()
