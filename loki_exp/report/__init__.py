"""``python -m loki_exp.report <multirun dir>``: one table of every run, curves, and the plots.

Reads each job's ``run.json`` / ``metrics.json`` / ``items.json`` / ``curve.jsonl``
(``collect``) and writes into the dir: ``report.csv`` (every metric) and ``report.md``
(``tables``): per run the task gain (gold-answer bits per byte, % below base), trained
accuracy, false-call rate and each forgetting measure with its 95% paired-bootstrap interval;
forgetting at matched task gain between methods, per run, and between runs of one setting
that differ in their rows or seed (``matched``, from the curves along training); then every
pair of runs of different arms whose task score or Avg forgetting differs significantly on the
same items (``differences``). Figures (``figures``):
``curves.png`` (every run's path along training and each arm's front), ``pareto.png`` (final
task gain against Avg forgetting and against KL drift, interval bars, each arm's
non-dominated runs joined), ``forgetting_vs_task.png`` and ``kva_heatmap.png`` (per layer, how
many of the most-often highest / lowest nodes sit there; the paper's Figure 2) when a run has
a KVA store. ``--html`` renders the same blocks as one page (``render``). An arm is a method,
with its quota and strategy for the methods that select rows (LoKI on KVA rows and on random
rows are two arms); learning rates label the points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loki_exp import atomic
from loki_exp.errors import LokiError
from loki_exp.report.collect import arm_label, collect_runs, run_curves, task_axis
from loki_exp.report.figures import (
    kva_extremes_per_layer,
    plot_curves,
    plot_forgetting_vs_task,
    plot_kva_heatmap,
    plot_pareto,
)
from loki_exp.report.matched import (
    matched_by_method,
    matched_by_run,
    matched_same_setting,
    paired_values,
)
from loki_exp.report.render import markdown_lines, write_csv
from loki_exp.report.tables import report_blocks

__all__ = ["arm_label", "collect_runs", "kva_extremes_per_layer", "make_report",
           "plot_forgetting_vs_task", "plot_kva_heatmap", "run_curves", "task_axis"]

CSV_COLUMNS = ["run", "label", "method", "strategy", "quota", "strategy_seed", "seed", "lr",
               "trainable_parameters"]


def make_report(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    if not root.is_dir():
        raise LokiError(f"report: {root} is not a directory (expected a multirun dir)")
    rows = collect_runs(root)
    values = paired_values(run_curves(rows))
    by_method, by_run = matched_by_method(values), matched_by_run(values)
    same_setting = matched_same_setting(values)
    blocks = report_blocks(rows, (by_method, by_run, same_setting))
    write_csv(rows, root / "report.csv", CSV_COLUMNS)
    table = markdown_lines(blocks)
    atomic.write_text(root / "report.md", "\n".join(table) + "\n")
    store = next((r["kva_store"] for r in rows if r.get("kva_store")
                  and Path(r["kva_store"]).exists()), None)
    return {"rows": rows, "blocks": blocks, "table": table,
            "plot": plot_forgetting_vs_task(rows, root), "pareto": plot_pareto(rows, root),
            "curves": plot_curves(values, root),
            "heatmap": plot_kva_heatmap(store, root) if store else None,
            "matched_by_method": by_method, "matched_by_run": by_run,
            "matched_same_setting": same_setting}
