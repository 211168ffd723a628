"""Pairs of runs of different arms whose task score or Avg forgetting differ significantly on
the same items (95% paired bootstrap of the difference)."""

from __future__ import annotations

from typing import Any

from loki_exp.evaluation.suite import primary_metric
from loki_exp.report.collect import load_items
from loki_exp.report.render import Block, Table, fmt


def significant_differences(rows: list[dict[str, Any]], task_item: str | None) -> list[Block]:
    """Pairs of runs of different arms whose task score or Avg forgetting differ, with the
    95% paired bootstrap interval of the difference over the same items (``task_item``: the
    per-item key of the task score)."""
    from loki_exp.evaluation.bootstrap import (
        avg_difference_ci,
        paired_difference_ci,
        significant,
        stratified_delta_ci,
    )
    from loki_exp.evaluation.scores import category_keys

    items = {r["run"]: load_items(r) for r in rows}
    found = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["label"] == b["label"] or not items[a["run"]] or not items[b["run"]]:
                continue
            ia, ib = items[a["run"]], items[b["run"]]
            ci = None
            if task_item in ia and task_item in ib:
                ci = paired_difference_ci(ia[task_item]["after"], ib[task_item]["after"])
            elif task_item and (cats := category_keys(ia, task_item)) \
                    and all(c in ib for c in cats):  # a mean over categories (BFCL's overall)
                ci = stratified_delta_ci({c: ia[c]["after"] for c in cats},
                                         {c: ib[c]["after"] for c in cats})
            if ci is not None and significant(ci):
                found.append((a, b, "task score (b - a)", ci))
            keys = [k for k in _forgetting_items(ia, a.get("forgetting_metric")) if k in ib]
            if keys:
                signs = {k: -1.0 for k in keys if k.startswith("bpb/")}
                ci = avg_difference_ci({k: ia[k]["before"] for k in keys},
                                       {k: ia[k]["after"] for k in keys},
                                       {k: ib[k]["after"] for k in keys}, signs)
                if significant(ci):
                    found.append((a, b, "Avg forgetting % (b - a)", ci))
    if not found:
        return ["\nNo difference between runs of different arms is significant (95%)."]
    head = ("\nSignificant differences between arms (95% paired bootstrap; for gold bits per "
            "byte, lower is better):\n")
    return [head, Table(["run a", "run b", "measure", "interval"],
                        [[_label(a), _label(b), what, f"[{low:.3g}, {high:.3g}]"]
                         for a, b, what, (low, high) in found])]


def _label(row: dict[str, Any]) -> str:
    return f"{row['label']} lr={fmt(row.get('lr'))}"


def _forgetting_items(items: dict[str, Any], primary: str | None) -> list[str]:
    """The per-item keys that make up ``forgetting/avg``: each benchmark's primary metric
    (:func:`~loki_exp.evaluation.suite.primary_metric`) and the bits-per-byte sets."""
    keys = [k for k in items if k.startswith("bpb/")]
    benches = {k.split("/")[1] for k in items if k.startswith("bench/")}
    for bench in sorted(benches):
        metrics = [k.split("/")[2] for k in items if k.startswith(f"bench/{bench}/")]
        keys.append(f"bench/{bench}/{primary_metric(bench, metrics, primary)}")
    return [k for k in keys if k in items and items[k].get("before") is not None]
