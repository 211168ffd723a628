"""Scores: the paper's Avg forgetting and the flat metric names written to metrics.json."""

from __future__ import annotations

from loki_exp.errors import LokiError


def category_keys(keys, key: str) -> list[str]:
    """The per-category item keys (``task/bfcl/trained_accuracy/<category>``) whose unweighted
    mean is the score ``key`` (``task/bfcl/trained_accuracy``); empty when it is not such a
    mean."""
    return sorted(k for k in keys if k.startswith(f"{key}/") and k.count("/") == key.count("/") + 1)


def forgetting_avg(before: dict[str, float], after: dict[str, float],
                   signs: dict[str, float] | None = None) -> float:
    """``Avg = 100/N * sum_i s_i (S_o_i - S_t_i) / S_o_i`` over N measures (lower is better).

    ``s_i`` is +1 for a higher-is-better score (accuracy) and -1 for a lower-is-better one
    (bits per byte), so a positive term is always a loss: the paper's formula for the first,
    its mirror for the second (README "Measures")."""
    if not before or before.keys() != after.keys():
        raise LokiError(f"forgetting needs the same benchmarks before and after; got "
                        f"{sorted(before)} and {sorted(after)}")
    zero = [k for k, v in before.items() if v == 0]
    if zero:
        raise LokiError(f"base score is 0 on {zero}: relative forgetting is undefined there")
    sign = signs or {}
    return 100.0 / len(before) * sum(sign.get(k, 1.0) * (before[k] - after[k]) / before[k]
                                     for k in before)
