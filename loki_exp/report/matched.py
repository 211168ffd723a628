"""Learning against forgetting along training, compared at matched learning.

A run trained with ``eval.every_n_steps`` leaves ``curve.jsonl`` (``evaluation/curves.py``):
per point, per-item values of the task's gold-answer bits per byte, the KL drift on the base
model's answers and the forgetting suite's bits-per-byte sets, plus the base model's items.
From them, at every point:

- task gain  = 100 (mean base gold bpb - mean gold bpb) / mean base gold bpb (% lower);
- KL         = mean per-item KL(base || tuned);
- Avg (bpb)  = 100/N sum over the N bpb sets of (mean bpb - mean base bpb) / mean base bpb.

A run's path joins its points in step order (linear between them). Read at gain g, it is the
least forgetting anywhere on the path with at least that gain: at a point with gain >= g, or
where a segment crosses g (a run that never reaches g has no value there). A method's front
at g is the least of its runs' values: the lower envelope over its runs and points. Two
methods are compared at common levels of gain (25, 50 and 75% of the smaller of their best
gains), and each run at levels common to the study.
Intervals: 95% percentile bootstrap that resamples the items (the same indices for every run
and point: all runs score the same items, so the comparison is paired), with the levels held
fixed. Written by hand: no library computes matched comparisons over learning curves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loki_exp.evaluation.curve_records import read_records

log = logging.getLogger(__name__)

LEVELS = (0.25, 0.5, 0.75)
RESAMPLES = 1000
SEED = 0
MEASURES = {"kl": "KL(base || tuned), nats/token", "avg_bpb": "Avg forgetting on bpb sets, %"}


@dataclass
class Curve:
    """One run's points: per-item arrays [points, items] and the base items they pair with."""
    run: str
    label: str
    lr: float | None
    steps: np.ndarray
    task: np.ndarray
    base_task: np.ndarray
    kl: np.ndarray | None
    bpb: dict[str, np.ndarray]
    base_bpb: dict[str, np.ndarray]
    # runs with the same setting (method, quota, rate) differ only in their rows or seeds
    setting: tuple | None = None
    name: str = ""  # the run as the tables name it (arm, seed, rows' seed)

    def sizes(self) -> dict[str, int]:
        out = {"task": self.task.shape[1], **{k: v.shape[1] for k, v in self.bpb.items()}}
        if self.kl is not None:
            out["kl"] = self.kl.shape[1]
        return out


def load_curve(path: Path, run: str, label: str, lr: float | None, setting: tuple | None = None,
               name: str = "") -> Curve | None:
    """A run's ``curve.jsonl`` as a Curve (None, with a warning, when it cannot be read)."""
    try:
        records = read_records(path)
    except (OSError, ValueError) as err:
        log.warning("report: skipping %s: %s", path, err)
        return None
    base = next((r["items"] for r in records if r.get("model") == "base"), None)
    points = sorted((r for r in records if r.get("model") == "tuned"), key=lambda r: r["step"])
    if base is None or not points:
        return None
    gold = next((k for k in base if k.endswith("/gold_bpb")), None)
    if gold is None:
        log.warning("report: %s has no gold bits per byte: its curve is left out", path)
        return None
    sets = sorted(k for k in base if k.startswith("bpb/"))
    has_kl = all("drift/kl" in p["items"] for p in points)
    return Curve(
        run, label, lr, np.array([p["step"] for p in points]),
        np.array([p["items"][gold] for p in points], float), np.array(base[gold], float),
        np.array([p["items"]["drift/kl"] for p in points], float) if has_kl else None,
        {k: np.array([p["items"][k] for p in points], float) for k in sets},
        {k: np.array(base[k], float) for k in sets}, setting, name or run)


def point_values(curve: Curve, idx: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per point: task gain %, KL and Avg (bpb) %, on the items ``idx`` picks (all when None)."""
    def pick(key: str, a: np.ndarray) -> np.ndarray:
        return a if idx is None else a[..., idx[key]]

    base = pick("task", curve.base_task).mean()
    out = {"gain": 100.0 * (base - pick("task", curve.task).mean(axis=1)) / base}
    if curve.kl is not None:
        kl = pick("kl", curve.kl)
        out["kl"] = np.nanmean(kl, axis=1)
    if curve.bpb:
        terms = []
        for name, values in curve.bpb.items():
            b = pick(name, curve.base_bpb[name]).mean()
            terms.append((pick(name, values).mean(axis=1) - b) / b)
        out["avg_bpb"] = 100.0 * np.mean(terms, axis=0)
    return out


def at_gain(gain: np.ndarray, forgetting: np.ndarray, level: float) -> float:
    """The least forgetting on the path (points joined linearly) where the gain is at least
    ``level``: a point's, or a segment's where it crosses ``level`` (on a segment, forgetting
    is linear in gain, so its least with gain >= level is at one of those ends); nan when the
    path never reaches ``level``."""
    found = list(forgetting[gain >= level])
    g0, g1, f0, f1 = gain[:-1], gain[1:], forgetting[:-1], forgetting[1:]
    crosses = (np.minimum(g0, g1) < level) & (np.maximum(g0, g1) > level)
    t = (level - g0[crosses]) / (g1[crosses] - g0[crosses])
    found += list(f0[crosses] + t * (f1[crosses] - f0[crosses]))
    found = [f for f in found if f == f]
    return float(min(found)) if found else float("nan")


def front_at(values: list[dict[str, np.ndarray]], measure: str, level: float) -> float:
    """A method's front at ``level``: the least of its runs' forgetting there."""
    found = [at_gain(v["gain"], v[measure], level) for v in values if measure in v]
    found = [f for f in found if f == f]
    return min(found) if found else float("nan")


def _draws(curves: list[Curve], resamples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Item indices per resample, shared by every run and point (a paired bootstrap)."""
    sizes = curves[0].sizes()
    rng = np.random.default_rng(seed)
    return [{k: rng.integers(0, n, n) for k, n in sizes.items()} for _ in range(resamples)]


def _interval(samples: list[float]) -> tuple[float, float]:
    finite = np.array([s for s in samples if s == s])
    if len(finite) < 0.9 * len(samples) or not len(finite):
        return float("nan"), float("nan")  # the level was out of reach too often
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def comparable(curves: list[Curve]) -> list[Curve]:
    """The curves scored on the same items as the first (a paired comparison needs them)."""
    if not curves:
        return []
    same = [c for c in curves if c.sizes() == curves[0].sizes()]
    if len(same) < len(curves):
        log.warning("report: %d runs' curves hold other items than %s's; left out of the "
                    "matched comparison", len(curves) - len(same), curves[0].run)
    return same


@dataclass
class PairedValues:
    """The comparable curves, every point's values (by run) and the same values in each
    bootstrap resample of the items: computed once, read by every comparison and plot."""
    curves: list[Curve]
    point: dict[str, dict[str, np.ndarray]]
    boot: list[dict[str, dict[str, np.ndarray]]]


def paired_values(curves: list[Curve], resamples: int = RESAMPLES, seed: int = SEED) -> PairedValues:
    curves = comparable(curves)
    point = {c.run: point_values(c) for c in curves}
    boot = ([{c.run: point_values(c, idx) for c in curves} for idx in _draws(curves, resamples, seed)]
            if curves else [])
    return PairedValues(curves, point, boot)


def best_gain(values: PairedValues, label: str) -> float:
    return max(values.point[c.run]["gain"].max() for c in values.curves if c.label == label)


def matched_by_method(values: PairedValues, levels=LEVELS) -> list[dict[str, Any]]:
    """For every pair of methods and measure: each front at 25/50/75% of the smaller best
    gain, and the difference (b - a) with its 95% interval."""
    labels = sorted({c.label for c in values.curves})
    rows = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            best = min(best_gain(values, a), best_gain(values, b))
            if best > 0:
                rows += _compared(values, a, [c.run for c in values.curves if c.label == a],
                                  b, [c.run for c in values.curves if c.label == b],
                                  [frac * best for frac in levels], levels)
    return rows


def _compared(values: PairedValues, a: str, runs_a: list[str], b: str, runs_b: list[str],
              gains: list[float], levels) -> list[dict[str, Any]]:
    """Per measure and level: the fronts of ``runs_a`` and ``runs_b`` (a run's own value
    when it is alone) and their difference (b - a) with its 95% interval; levels that
    either side never reached are left out."""
    point, rows = values.point, []
    for measure in MEASURES:
        for frac, level in zip(levels, gains):
            va = front_at([point[r] for r in runs_a], measure, level)
            vb = front_at([point[r] for r in runs_b], measure, level)
            if va != va or vb != vb:
                continue
            low, high = _interval([front_at([s[r] for r in runs_b], measure, level)
                                   - front_at([s[r] for r in runs_a], measure, level)
                                   for s in values.boot])
            rows.append({"a": a, "b": b, "measure": measure, "fraction": frac, "gain": level,
                         "value_a": va, "value_b": vb, "difference": vb - va,
                         "ci_low": low, "ci_high": high})
    return rows


def common_best(values: PairedValues) -> float:
    """The smallest of the arms' best gains: levels below it are reached by every arm."""
    return min(best_gain(values, label) for label in {c.label for c in values.curves})


def matched_by_run(values: PairedValues, levels=LEVELS) -> list[dict[str, Any]]:
    """Every run's forgetting at 25/50/75% of the smallest of the methods' best gains (a
    level every method reached), with its 95% interval: seeds side by side."""
    if not values.curves:
        return []
    best = common_best(values)
    if best <= 0:
        return []
    rows = []
    for c in values.curves:
        mine = values.point[c.run]
        for measure in MEASURES:
            if measure not in mine:
                continue
            for frac in levels:
                level = frac * best
                value = at_gain(mine["gain"], mine[measure], level)
                samples = [at_gain(s[c.run]["gain"], s[c.run][measure], level)
                           for s in values.boot]
                low, high = _interval(samples) if value == value else (float("nan"),) * 2
                rows.append({"run": c.run, "label": c.label, "lr": c.lr, "measure": measure,
                             "fraction": frac, "gain": level, "value": value,
                             "ci_low": low, "ci_high": high})
    return rows


def matched_same_setting(values: PairedValues, levels=LEVELS) -> list[dict[str, Any]]:
    """Every pair of runs with one setting (method, quota, rate) that differ in their rows or
    seed: KVA's rows against random ones, one seed against another. The difference (b - a)
    in forgetting at ``matched_by_run``'s levels, with its 95% interval (items resampled,
    the same indices for both runs). The seed-against-seed pairs are the spread that the
    rows-against-rows pairs are read against."""
    best = common_best(values) if values.curves else 0.0
    if best <= 0:
        return []
    gains = [frac * best for frac in levels]
    rows = []
    for i, a in enumerate(values.curves):
        for b in values.curves[i + 1:]:
            if a.setting is not None and a.setting == b.setting:
                rows += _compared(values, a.name, [a.run], b.name, [b.run], gains, levels)
    return rows
