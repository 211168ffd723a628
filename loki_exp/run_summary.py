"""What a run did, in one short table: the headline measures with their 95% intervals, the
stage times and where the outputs are. Printed at the end of a run, written to
``summary.md`` in the run dir; its table leads the model card."""

from __future__ import annotations

from typing import Any

# (label, metric key without /before|/after|/delta, what the number is)
HEADLINE = (
    ("task: gold-answer bits per byte", "task/{task}/gold_bpb", "lower is better"),
    ("task: trained categories, AST accuracy", "task/{task}/trained_accuracy", "generated calls"),
    ("damage: false-call rate", "task/{task}/false_call_rate", "irrelevance items, lower is better"),
    ("task: transfer accuracy", "task/{task}/transfer_accuracy", "untrained call categories"),
)
# (label, key, the key its interval hangs on, what the number is)
FORGETTING = (
    ("forgetting: Avg %", "forgetting/avg", "forgetting/avg", "benchmarks + bpb sets, lower is better"),
    ("forgetting: KL drift from the base", "drift/kl/after", "drift/kl",
     "KL(base, tuned) in nats/token on the base's answers, lower is better"),
)


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _interval(metrics: dict[str, float], key: str) -> str:
    low, high = metrics.get(f"{key}/ci_low"), metrics.get(f"{key}/ci_high")
    if low is None or low != low:
        return ""
    return f"[{_num(low)}, {_num(high)}]"


def headline_table(metrics: dict[str, float], task: str) -> list[str]:
    """Markdown rows: each headline measure before / after / change with its interval."""
    rows = ["| measure | before | after | change [95% interval] | |", "| --- | ---: | ---: | --- | --- |"]
    for label, key, note in HEADLINE:
        key = key.format(task=task)
        if f"{key}/after" not in metrics:
            continue
        change = f"{_num(metrics.get(f'{key}/delta'))} {_interval(metrics, f'{key}/delta')}"
        if f"{key}/reduction_pct" in metrics:
            note = (f"{_num(metrics[f'{key}/reduction_pct'])}% below base "
                    f"{_interval(metrics, f'{key}/reduction_pct')}; {note}")
        rows.append(f"| {label} | {_num(metrics.get(f'{key}/before'))} | "
                    f"{_num(metrics[f'{key}/after'])} | {change.strip()} | {note} |")
    for label, key, ci, note in FORGETTING:
        if key in metrics:
            rows.append(f"| {label} | | {_num(metrics[key])} | {_interval(metrics, ci)} | {note} |")
    return rows


def data_kept(by_category: dict[str, dict[str, int]] | None) -> str | None:
    """``simple_python 326/326, multiple 165/166 (1 dropped)``: training examples kept."""
    if not by_category:
        return None
    parts = []
    for category, n in by_category.items():
        lost = [f"{n[k]} {k}" for k in ("dropped", "truncated") if n.get(k)]
        parts.append(f"{category} {n['kept']}/{n['examples']}" + (f" ({', '.join(lost)})" if lost else ""))
    return "Training examples kept (of those given), by category: " + ", ".join(parts)


def summary_lines(metrics: dict[str, float] | None, task: str, timings: dict[str, float],
                  paths: dict[str, Any], precision: str | None = None,
                  data: dict[str, dict[str, int]] | None = None) -> list[str]:
    """``precision``: the stages' precisions in one line (``precision_record``)."""
    lines = ["## Run summary", ""]
    if metrics:
        lines += [*headline_table(metrics, task), ""]
    else:
        lines += ["Not evaluated (no `evaluate` in stages).", ""]
    if data_kept(data):
        lines.append(data_kept(data))
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    lines.append(f"Stage times: {stages} (total {sum(timings.values()) / 60:.1f} min)")
    if precision:
        lines.append(precision)
    lines += [f"- {name}: {path}" for name, path in paths.items() if path]
    return lines
