"""Curves along training compared at matched learning, on hand-made curves with known answers,
and the report's arms (quota and strategy only for methods that select rows)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loki_exp.report import make_report
from loki_exp.report.matched import (
    at_gain,
    front_at,
    matched_by_method,
    matched_by_run,
    matched_same_setting,
    paired_values,
)

N = 40  # items per measure


def _write_curve(run_dir, gains, kls, bpb_pcts, noise=0.0, seed=0):
    """curve.jsonl whose points have exactly these task gains (% lower gold bpb), KL means and
    Avg bpb forgetting (%), with constant items (noise 0: every resample gives the same)."""
    shared = np.random.default_rng(0)  # every run scores the same base items
    base = 2.0 + noise * shared.standard_normal(N)
    bpb_base = 1.0 + noise * shared.standard_normal(N)
    rng = np.random.default_rng(seed)
    records = [{"model": "base", "items": {"task/bfcl/gold_bpb": base.tolist(),
                                           "bpb/gsm8k": bpb_base.tolist()}}]
    for step, (g, kl, f) in enumerate(zip(gains, kls, bpb_pcts)):
        task = base * (1 - g / 100)
        kl_items = kl + noise * rng.standard_normal(N)
        bpb = bpb_base * (1 + f / 100)
        records.append({"model": "tuned", "step": 10 * step, "seconds": 1.0, "metrics": {},
                        "items": {"task/bfcl/gold_bpb": task.tolist(), "drift/kl": kl_items.tolist(),
                                  "bpb/gsm8k": bpb.tolist()}})
    run_dir.mkdir(parents=True)
    (run_dir / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_run(run_dir, method, lr, quota=10, strategy="layer_balanced", seed=42):
    record = {"config": {"method": {"name": method, "lr": lr}, "quota": quota, "seed": seed,
                         "strategy": {"name": strategy, "seed": 7}, "eval": {}},
              "implant": {"lr": lr, "data_by_category": {
                  "multiple": {"examples": 166, "kept": 165, "dropped": 1, "truncated": 0}}},
              "metrics": {}}
    (run_dir / "run.json").write_text(json.dumps(record))


def test_at_gain_is_the_least_forgetting_on_the_path_with_that_gain():
    gain = np.array([0.0, 20.0, 40.0, 30.0, 60.0])
    forget = np.array([0.0, 1.0, 3.0, 4.0, 10.0])
    assert at_gain(gain, forget, 10.0) == pytest.approx(0.5)
    # 35 is crossed three times (2.5, 3.5 and 5.0) and reached at (40, 3): the least is 2.5.
    assert at_gain(gain, forget, 35.0) == pytest.approx(2.5)
    assert at_gain(gain, forget, 50.0) == pytest.approx(8.0)  # between 30 (4.0) and 60 (10.0)
    assert at_gain(gain, forget, 0.0) == 0.0
    assert np.isnan(at_gain(gain, forget, 61.0))
    # A later point with more gain and less forgetting pulls the value down (the envelope).
    late = np.array([0.0, 1.0, 0.2])
    assert at_gain(np.array([0.0, 10.0, 20.0]), late, 5.0) == pytest.approx(0.2)
    values = [{"gain": gain, "kl": forget}, {"gain": np.array([0.0, 40.0]), "kl": np.array([0, 1.0])}]
    assert front_at(values, "kl", 20.0) == pytest.approx(0.5)  # the second run's 0.5 < 1.0


def test_matched_comparison_on_known_curves(tmp_path):
    """A: gains 0-20-40 with KL 0-0.1-0.2; B: gains 0-10-30 with KL 0-0.3-0.9 (two lrs, the
    second worse). Levels: 25/50/75% of min(40, 30) = 7.5, 15, 22.5. A's KL there: 0.0375,
    0.075, 0.1125; B's: 0.225, 0.45, 0.675 (from its better run)."""
    from loki_exp.report import collect_runs, run_curves

    root = tmp_path / "multirun"
    _write_curve(root / "0", [0, 20, 40], [0, 0.1, 0.2], [0, 1, 2])
    _write_run(root / "0", "loki", 1e-3)
    _write_curve(root / "1", [0, 10, 30], [0, 0.3, 0.9], [0, 3, 9])
    _write_run(root / "1", "lora", 1e-3)
    _write_curve(root / "2", [0, 5, 30], [0, 0.5, 1.5], [0, 5, 15])
    _write_run(root / "2", "lora", 1e-2)
    curves = run_curves(collect_runs(root))
    rows = matched_by_method(paired_values(curves, resamples=50))
    kl = [r for r in rows if r["measure"] == "kl"]
    assert [r["gain"] for r in kl] == pytest.approx([7.5, 15.0, 22.5])
    assert [r["value_a"] for r in kl] == pytest.approx([0.0375, 0.075, 0.1125])
    assert [r["value_b"] for r in kl] == pytest.approx([0.225, 0.45, 0.675])
    assert {(r["a"], r["b"]) for r in rows} == {("loki q=10 layer_balanced", "lora")}
    # Constant items: every resample gives the point estimate, so the interval is a point.
    for r in kl:
        assert r["ci_low"] == pytest.approx(r["difference"]) == pytest.approx(r["ci_high"])
    avg = [r for r in rows if r["measure"] == "avg_bpb"]
    assert [r["value_a"] for r in avg] == pytest.approx([0.375, 0.75, 1.125])
    assert [r["value_b"] for r in avg] == pytest.approx([2.25, 4.5, 6.75])
    per_run = matched_by_run(paired_values(curves, resamples=50))
    lora_worse = [r for r in per_run if r["run"] == "2" and r["measure"] == "kl"]
    # Run 2: gain 0 -> 5 -> 30 with KL 0 -> 0.5 -> 1.5; at 7.5: 0.5 + 2.5/25 * 1.0 = 0.6.
    assert lora_worse[0]["value"] == pytest.approx(0.6)


def test_runs_of_one_setting_are_compared_pairwise_at_the_common_levels(tmp_path):
    """KVA rows (seeds 42 and 43) and random rows at one rate: every pair of them at 25/50/75%
    of the smallest arm's best gain (LoRA's 40 here); a LoRA run has another setting."""
    from loki_exp.report import collect_runs, run_curves

    root = tmp_path / "multirun"
    for run, kls, strategy, seed in (("0", [0, 0.1, 0.2], "layer_balanced", 42),
                                     ("1", [0, 0.3, 0.6], "random", 42),
                                     ("2", [0, 0.2, 0.4], "layer_balanced", 43)):
        _write_curve(root / run, [0, 20, 40], kls, [0, 1, 2])
        _write_run(root / run, "loki", 1e-3, strategy=strategy, seed=seed)
    _write_curve(root / "3", [0, 10, 40], [0, 1, 2], [0, 1, 2])
    _write_run(root / "3", "lora", 1e-3)
    rows = matched_same_setting(paired_values(run_curves(collect_runs(root)), resamples=50))
    at_20 = {(r["a"], r["b"]): r for r in rows if r["measure"] == "kl" and r["gain"] == 20.0}
    kva, rand, kva2 = ("0: loki q=10 layer_balanced, seed 42", "1: loki q=10 random, seed 42, rows 7",
                       "2: loki q=10 layer_balanced, seed 43")
    assert set(at_20) == {(kva, rand), (kva, kva2), (rand, kva2)}
    # Differences of hand-written decimals (0.3 - 0.1): exact up to float rounding, ~1e-17,
    # far inside approx's default 1e-6 relative.
    assert at_20[(kva, rand)]["difference"] == pytest.approx(0.2)
    assert at_20[(kva, kva2)]["difference"] == pytest.approx(0.1)
    assert at_20[(rand, kva2)]["difference"] == pytest.approx(-0.1)
    assert at_20[(kva, rand)]["ci_low"] == pytest.approx(0.2)  # constant items: a point
    assert sorted({r["gain"] for r in rows}) == pytest.approx([10.0, 20.0, 30.0])


def test_matched_intervals_cover_a_real_difference_with_noisy_items(tmp_path):
    from loki_exp.report import collect_runs, run_curves

    root = tmp_path / "multirun"
    _write_curve(root / "0", [0, 20, 40], [0, 0.1, 0.2], [0, 1, 2], noise=0.05, seed=1)
    _write_run(root / "0", "loki", 1e-3)
    _write_curve(root / "1", [0, 20, 40], [0, 0.4, 0.8], [0, 1, 2], noise=0.05, seed=2)
    _write_run(root / "1", "full", 1e-4)
    rows = matched_by_method(paired_values(run_curves(collect_runs(root)), resamples=300))
    at_half = next(r for r in rows if r["measure"] == "kl" and r["fraction"] == 0.5)
    # full: KL 0.4 at 20% gain; loki: 0.1; loki - full = -0.3 (arms in name order: a = full),
    # its interval about +-2 x 0.05 x sqrt(2 / 40) wide.
    assert (at_half["a"], at_half["b"]) == ("full", "loki q=10 layer_balanced")
    assert at_half["difference"] == pytest.approx(-0.3, abs=0.03)
    assert -0.35 < at_half["ci_low"] < at_half["difference"] < at_half["ci_high"] < -0.25


def test_report_arms_curves_and_matched_tables(tmp_path):
    root = tmp_path / "multirun"
    _write_curve(root / "0", [0, 20, 40], [0, 0.1, 0.2], [0, 1, 2])
    _write_run(root / "0", "loki", 1e-3)
    _write_curve(root / "1", [0, 30, 50], [0, 0.2, 0.4], [0, 1, 2])
    _write_run(root / "1", "loki", 1e-3, strategy="random")
    _write_curve(root / "2", [0, 10, 30], [0, 0.3, 0.9], [0, 3, 9])
    _write_run(root / "2", "lora", 1e-3)
    out = make_report(root)
    rows = {r["run"]: r for r in out["rows"]}
    # Quota and strategy belong to the methods that select rows; a LoRA run has neither.
    assert rows["2"]["quota"] is None and rows["2"]["strategy"] is None
    assert rows["2"]["label"] == "lora"
    assert rows["1"]["label"] == "loki q=10 random" and rows["1"]["strategy_seed"] == 7
    md = (root / "report.md").read_text()
    assert "## Forgetting at matched task gain (along training)" in md
    assert "| loki q=10 layer_balanced | loki q=10 random | kl | 10 (25% of the smaller best)" in md
    assert out["curves"].stat().st_size > 20_000
    assert ("Training examples kept (of those given), by category: multiple 165/166 (1 dropped) "
            "(every run with training, 3)") in md
    csv_head = (root / "report.csv").read_text().splitlines()[0]
    assert csv_head.startswith("run,label,method,strategy,quota,strategy_seed,seed,lr")


# matched_study's 10 runs take 5 s: slow (curve_demo and matched_pilot keep the fast loop's check).
@pytest.mark.parametrize("study", ["curve_demo", pytest.param("matched_study", marks=pytest.mark.slow),
                                   "matched_pilot"])
def test_a_committed_study_re_renders_from_its_records(tmp_path, study):
    """docs/results/<study>: `python -m loki_exp.report` on its committed records writes the
    committed report.md and report.csv again."""
    import shutil

    from tests.support.paths import ROOT

    committed = ROOT / "docs" / "results" / study
    copy = tmp_path / "study"
    shutil.copytree(committed, copy)
    for name in ("report.md", "report.csv"):
        (copy / name).unlink()
    make_report(copy)
    for name in ("report.md", "report.csv"):
        assert (copy / name).read_text() == (committed / name).read_text(), name
