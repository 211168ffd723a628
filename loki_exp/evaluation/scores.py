"""Scores: the paper's Avg forgetting and the flat metric names written to metrics.json."""

from __future__ import annotations

from loki_exp.errors import LokiError


def forgetting_avg(before: dict[str, float], after: dict[str, float]) -> float:
    """``Avg = 100/N * sum_i (S_o_i - S_t_i) / S_o_i`` over the N benchmarks (lower is better)."""
    if not before or before.keys() != after.keys():
        raise LokiError(f"forgetting needs the same benchmarks before and after; got "
                        f"{sorted(before)} and {sorted(after)}")
    zero = [k for k, v in before.items() if v == 0]
    if zero:
        raise LokiError(f"base score is 0 on {zero}: relative forgetting is undefined there")
    return 100.0 / len(before) * sum((before[k] - after[k]) / before[k] for k in before)
