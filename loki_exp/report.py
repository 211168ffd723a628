"""``python -m loki_exp.report <multirun dir>``: one table of every run, curves, and the plots.

Reads each job's ``run.json`` / ``metrics.json`` / ``items.json`` / ``curve.jsonl`` and writes
into the dir: ``report.csv`` (every metric) and ``report.md``: per run the task gain (gold-
answer bits per byte, % below base), trained accuracy, false-call rate and each forgetting
measure with its 95% paired-bootstrap interval; forgetting at matched task gain between
methods and per run (``report_curves``, from the curves along training); then every pair of
runs of different arms whose task score or Avg forgetting differs significantly on the same
items. Figures: ``curves.png`` (every run's path along training and each arm's front),
``pareto.png`` (final task gain against Avg forgetting and against KL drift, interval bars,
each arm's non-dominated runs joined), ``forgetting_vs_task.png`` and ``kva_heatmap.png``
(per layer, how many of the most-often highest / lowest nodes sit there; the paper's
Figure 2) when a run has a KVA store. An arm is a method, with its quota and strategy for
the methods that select rows (LoKI on KVA rows and on random rows are two arms); learning
rates label the points.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from loki_exp import atomic
from loki_exp.cli import report_user_errors
from loki_exp.errors import LokiError
from loki_exp.evaluation.benchmarks import primary_metric
from loki_exp.evaluation.curves import FILE as CURVE_FILE
from loki_exp.report_curves import (
    Curve,
    load_curve,
    matched_by_method,
    matched_by_run,
    paired_values,
    plot_curves,
)
from loki_exp.report_figures import save_figure
from loki_exp.run_summary import data_kept

log = logging.getLogger(__name__)


def _read_json(path: Path) -> Any:
    """The file's JSON, or None (with a warning naming it) when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("report: skipping %s: %s", path, err)
        return None


def arm_label(method: str, quota: Any = None, strategy: str | None = None) -> str:
    """``loki q=10 layer_balanced`` for a method that selects rows, else the method."""
    if quota is None:
        return method
    return f"{method} q={quota:g} {strategy}"


def collect_runs(root: Path) -> list[dict[str, Any]]:
    from loki_exp.implant.methods import SELECTING_METHODS

    rows = []
    for record_path in sorted(root.rglob("run.json")):
        record = _read_json(record_path)
        if not isinstance(record, dict) or "config" not in record:
            continue
        cfg = record["config"]
        metrics = record.get("metrics") or {}
        metrics_path = record_path.parent / "metrics.json"
        if metrics_path.exists():  # the evaluate stage's own file, if the record lacks them
            metrics = _read_json(metrics_path)
            if metrics is None:
                continue
        here = record_path.parent
        method = cfg["method"]["name"]
        selects = method in SELECTING_METHODS and not cfg.get("positions_file")
        strategy = cfg.get("strategy") or {}
        row = {"run": str(here.relative_to(root)), "method": method,
               "strategy": strategy.get("name") if selects else None,
               "quota": cfg.get("quota") if selects else None,
               "strategy_seed": strategy.get("seed") if selects and strategy.get("name") == "random"
               else None,
               "seed": cfg.get("seed"),
               "lr": (record.get("implant") or {}).get("lr") or cfg["method"].get("lr"),
               "items": str(here / "items.json") if (here / "items.json").exists() else None,
               "curve": str(here / CURVE_FILE) if (here / CURVE_FILE).exists() else None,
               "forgetting_metric": cfg.get("eval", {}).get("forgetting_metric"),
               "trainable_parameters": (record.get("implant") or {}).get("trainable_parameters"),
               "data_by_category": (record.get("implant") or {}).get("data_by_category"),
               "kva_store": record.get("kva_store")}
        row["label"] = arm_label(method, row["quota"], row["strategy"])
        row.update(metrics)
        rows.append(row)
    if not rows:
        raise LokiError(f"{root} holds no readable run.json: expected a Hydra multirun dir of "
                        "loki_exp runs")
    return rows


def task_axis(rows: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(key, axis label) of the task gain, whose interval hangs on the same key: the gold-
    answer bits per byte's reduction where runs have it, else the task score's change (older
    runs)."""
    gold = sorted({k for r in rows for k in r if k.endswith("/gold_bpb/reduction_pct")})
    if gold:
        return gold[0], "task gain: gold-answer bits per byte, % below base"
    key = _task_key(rows)
    if key is None:
        return None
    return key.replace("/after", "/delta"), f"task gain: {key.removesuffix('/after')} after - before"


def _task_key(rows: list[dict[str, Any]]) -> str | None:
    """The task's overall score (``task/<name>/<metric>/after``), not a category's."""
    keys = sorted({k for r in rows for k in r if k.startswith("task/") and k.endswith("/after")},
                  key=lambda k: (k.count("/"), k))
    return keys[0] if keys else None


def write_table(rows: list[dict[str, Any]], root: Path,
                matched: tuple[list, list] = ([], [])) -> list[str]:
    fixed = ["run", "label", "method", "strategy", "quota", "strategy_seed", "seed", "lr",
             "trainable_parameters"]
    metric_cols = sorted({k for r in rows for k in r if "/" in k})
    columns = fixed + [c for c in metric_cols if c != "forgetting/avg"] + ["forgetting/avg"]
    with atomic.writing(root / "report.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    axis = task_axis(rows)
    gold = axis is not None and axis[0].endswith("/gold_bpb/reduction_pct")
    task = axis[0].removesuffix("/gold_bpb/reduction_pct") if gold else None
    # (column, the value's key, the key its interval hangs on)
    summary = [("task gain %" if task else "task gain", axis[0] if axis else None,
                axis[0] if axis else None)]
    if task:
        summary += [("trained accuracy change", f"{task}/trained_accuracy/delta",
                     f"{task}/trained_accuracy/delta"),
                    ("false-call rate", f"{task}/false_call_rate/after",
                     f"{task}/false_call_rate/delta")]
    summary += [("Avg forgetting %", "forgetting/avg", "forgetting/avg"),
                ("Avg, benchmarks only %", "forgetting/avg_benchmarks", "forgetting/avg_benchmarks"),
                ("KL drift", "drift/kl/after", "drift/kl"),
                ("format damage", "drift/format_damage/delta", "drift/format_damage/delta")]
    summary = [s for s in summary if s[1] and any(s[1] in r for r in rows)]
    head = ["arm", "lr", "seed"] + [label for label, _, _ in summary]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        seed = _fmt(r.get("seed")) + (f", rows {r['strategy_seed']}"
                                      if r.get("strategy_seed") is not None else "")
        cells = [r["label"], _fmt(r.get("lr")), seed]
        cells += [_with_interval(r, key, ci) for _, key, ci in summary]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nIntervals: 95% paired bootstrap over the same items before and after "
                 "(`*`: excludes 0). Lower is better for every forgetting measure and the "
                 "false-call rate (its interval is that of its change).")
    if axis:
        base_key = (f"{task}/gold_bpb/before" if task
                    else axis[0].replace("/delta", "/before"))
        base = next((r.get(base_key) for r in rows if r.get(base_key) is not None), None)
        lines.append(f"Base model: {base_key.removesuffix('/before')} = {_fmt(base)}")
    lines += data_lines(rows)
    lines += matched_lines(*matched)
    lines += significant_differences(rows, task_items_key(rows))
    atomic.write_text(root / "report.md", "\n".join(lines) + "\n")
    return lines


def data_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Training examples kept per category: one line when every run kept the same."""
    kept = {r["run"]: data_kept(r.get("data_by_category")) for r in rows}
    found = {k: v for k, v in kept.items() if v}
    if not found:
        return []
    if len(set(found.values())) == 1:
        return [next(iter(found.values())) + f" (every run with training, {len(found)})"]
    return [f"- {run}: {text}" for run, text in found.items()]


def task_items_key(rows: list[dict[str, Any]]) -> str | None:
    """The per-item key that the task's significance test pairs."""
    axis = task_axis(rows)
    if axis is None:
        return None
    if axis[0].endswith("/reduction_pct"):
        return axis[0].removesuffix("/reduction_pct")
    return axis[0].removesuffix("/delta")


def matched_lines(by_method: list[dict[str, Any]], by_run: list[dict[str, Any]]) -> list[str]:
    """report.md's sections on forgetting at matched task gain (``report_curves``)."""
    if not by_method and not by_run:
        return []
    out = ["\n## Forgetting at matched task gain (along training)\n",
           "Task gain: gold-answer bits per byte, % below base. A run at a gain: the least "
           "forgetting anywhere on its path (evaluation points joined linearly) with at least "
           "that gain; an arm's front: the least over its runs. Intervals: 95% bootstrap over "
           "the same items, levels fixed."]
    if by_method:
        out += ["", "| arm a | arm b | measure | at gain % | a | b | b - a [95%] |",
                "| --- | --- | --- | ---: | ---: | ---: | --- |"]
        for m in by_method:
            star = "*" if m["ci_low"] > 0 or m["ci_high"] < 0 else ""
            out.append(f"| {m['a']} | {m['b']} | {m['measure']} | {m['gain']:.3g} "
                       f"({m['fraction']:.0%} of the smaller best) | {m['value_a']:.3g} | "
                       f"{m['value_b']:.3g} | {m['difference']:.3g}{star} "
                       f"[{m['ci_low']:.3g}, {m['ci_high']:.3g}] |")
    if by_run:
        out += ["", "Every run at the same levels (% of the smallest of the arms' best gains):", "",
                "| run | arm | lr | measure | at gain % | forgetting [95%] |",
                "| --- | --- | ---: | --- | ---: | --- |"]
        for m in by_run:
            value = "not reached" if m["value"] != m["value"] else \
                f"{m['value']:.3g} [{m['ci_low']:.3g}, {m['ci_high']:.3g}]"
            out.append(f"| {m['run']} | {m['label']} | {_fmt(m['lr'])} | {m['measure']} | "
                       f"{m['gain']:.3g} | {value} |")
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def _with_interval(row: dict[str, Any], key: str, ci: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    low, high = row.get(f"{ci}/ci_low"), row.get(f"{ci}/ci_high")
    if low is None or low != low:
        return _fmt(value)
    star = "*" if low > 0 or high < 0 else ""
    return f"{value:.3g}{star} [{low:.3g}, {high:.3g}]"


def _load_items(row: dict[str, Any]) -> dict[str, Any]:
    return (_read_json(Path(row["items"])) or {}) if row.get("items") else {}


def significant_differences(rows: list[dict[str, Any]], task_item: str | None) -> list[str]:
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

    items = {r["run"]: _load_items(r) for r in rows}
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
    out = ["\nSignificant differences between arms (95% paired bootstrap; for gold bits per "
           "byte, lower is better):\n",
           "| run a | run b | measure | interval |", "| --- | --- | --- | --- |"]
    for a, b, what, (low, high) in found:
        out.append(f"| {_label(a)} | {_label(b)} | {what} | [{low:.3g}, {high:.3g}] |")
    return out


def _forgetting_items(items: dict[str, Any], primary: str | None) -> list[str]:
    """The per-item keys that make up ``forgetting/avg``: each benchmark's primary metric
    (:func:`~loki_exp.evaluation.benchmarks.primary_metric`) and the bits-per-byte sets."""
    keys = [k for k in items if k.startswith("bpb/")]
    benches = {k.split("/")[1] for k in items if k.startswith("bench/")}
    for bench in sorted(benches):
        metrics = [k.split("/")[2] for k in items if k.startswith(f"bench/{bench}/")]
        keys.append(f"bench/{bench}/{primary_metric(bench, metrics, primary)}")
    return [k for k in keys if k in items and items[k].get("before") is not None]


def _label(row: dict[str, Any]) -> str:
    return f"{row['label']} lr={_fmt(row.get('lr'))}"


def plot_forgetting_vs_task(rows: list[dict[str, Any]], root: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = task_axis(rows)
    points = [r for r in rows if axis and r.get(axis[0]) is not None
              and r.get("forgetting/avg") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label in sorted({r["label"] for r in points}):
        mine = sorted((r for r in points if r["label"] == label), key=lambda r: r[axis[0]])
        gain = [r[axis[0]] for r in mine]
        forget = [r["forgetting/avg"] for r in mine]
        ax.plot(gain, forget, marker="o", label=label)
        for r, x, y in zip(mine, gain, forget):
            ax.annotate(f"lr {_fmt(r.get('lr'))}", (x, y), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel(axis[1])
    ax.set_ylabel("Avg forgetting, % (lower is better)")
    ax.set_title("Forgetting vs task gain, end of training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, root / "forgetting_vs_task.png")


def _front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (more gain, less forgetting), by gain."""
    keep = [i for i, (g, f) in enumerate(points)
            if not any(g2 >= g and f2 <= f and (g2, f2) != (g, f) for g2, f2 in points)]
    return sorted(keep, key=lambda i: points[i][0])


def _err(row: dict[str, Any], value: float, ci: str) -> tuple[float, float]:
    low, high = row.get(f"{ci}/ci_low"), row.get(f"{ci}/ci_high")
    if low is None or low != low:
        return 0.0, 0.0
    return value - low, high - value


def plot_pareto(rows: list[dict[str, Any]], root: Path) -> Path | None:
    """Final task gain against Avg forgetting (and against KL drift where measured), one front
    per arm, 95% interval bars on both axes, as Biderman et al. (2024) compare methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = task_axis(rows)
    if not axis:
        return None
    gain_key, xlabel = axis
    panels = [(k, ci, label) for k, ci, label in
              [("forgetting/avg", "forgetting/avg", "Avg forgetting, % of base (lower is better)"),
               ("drift/kl/after", "drift/kl", "KL(base || tuned), nats/token (lower is better)")]
              if any(r.get(k) is not None for r in rows)]
    points = [r for r in rows if r.get(gain_key) is not None]
    if not points or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    for ax, (key, ci, ylabel) in zip(axes[0], panels):
        for n, label in enumerate(sorted({r["label"] for r in points})):
            mine = [r for r in points if r["label"] == label and r.get(key) is not None]
            if not mine:
                continue
            color = f"C{n}"
            xy = [(r[gain_key], r[key]) for r in mine]
            xerr = np.array([_err(r, r[gain_key], gain_key) for r in mine]).T
            yerr = np.array([_err(r, r[key], ci) for r in mine]).T
            ax.errorbar([p[0] for p in xy], [p[1] for p in xy], xerr=xerr, yerr=yerr, fmt="o",
                        color=color, alpha=0.55, capsize=2, lw=0.8)
            front = _front(xy)
            ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "-o", color=color,
                    label=f"{label} (front)")
            for r, (x, y) in zip(mine, xy):
                ax.annotate(f"lr {_fmt(r.get('lr'))}", (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=color)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("Learning vs forgetting at the end of training, one front per arm "
                 "(bars: 95% paired bootstrap)")
    fig.tight_layout()
    return save_figure(fig, root / "pareto.png")


def kva_extremes_per_layer(store: str, quota: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, how many of the q% most-often highest / lowest nodes sit there."""
    from loki_exp.kva.store import StoreView
    from loki_exp.selection import select

    with StoreView(store) as view:
        high = select(view.chunks(), quota, "global_highest")
    with StoreView(store) as view:
        low = select(view.chunks(), quota, "global_lowest")
    return np.array([len(p) for p in high]), np.array([len(p) for p in low])


def plot_kva_heatmap(store: str, root: Path, quota: float = 10.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    high, low = kva_extremes_per_layer(store, quota)
    fig, ax = plt.subplots(figsize=(8, 2.4))
    image = ax.imshow(np.stack([high, low]), aspect="auto", cmap="viridis")
    ax.set_yticks([0, 1], [f"top {quota:g}% highest", f"top {quota:g}% lowest"])
    ax.set_xlabel("decoder layer (0 = first)")
    ax.set_title("Where the most-often highest / lowest KVA nodes sit")
    fig.colorbar(image, ax=ax, label="nodes (count)")
    fig.tight_layout()
    return save_figure(fig, root / "kva_heatmap.png")


def run_curves(rows: list[dict[str, Any]]) -> list[Curve]:
    curves = [load_curve(Path(r["curve"]), r["run"], r["label"], r.get("lr"))
              for r in rows if r.get("curve")]
    return [c for c in curves if c is not None]


def make_report(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    if not root.is_dir():
        raise LokiError(f"report: {root} is not a directory (expected a multirun dir)")
    rows = collect_runs(root)
    values = paired_values(run_curves(rows))
    by_method, by_run = matched_by_method(values), matched_by_run(values)
    table = write_table(rows, root, (by_method, by_run))
    plot = plot_forgetting_vs_task(rows, root)
    pareto = plot_pareto(rows, root)
    curve_plot = plot_curves(values, root)
    store = next((r["kva_store"] for r in rows if r.get("kva_store")
                  and Path(r["kva_store"]).exists()), None)
    heatmap = plot_kva_heatmap(store, root) if store else None
    return {"rows": rows, "table": table, "plot": plot, "pareto": pareto, "curves": curve_plot,
            "heatmap": heatmap, "matched_by_method": by_method, "matched_by_run": by_run}


def log_to_wandb(out: dict[str, Any], project: str, group: str) -> None:
    """The table and both images as one W&B run of the sweep's group."""
    import wandb

    rows = out["rows"]
    columns = sorted({k for r in rows for k in r})
    run = wandb.init(project=project, group=group, job_type="report", name=f"{group}-report")
    run.log({"report/table": wandb.Table(columns=columns,
                                         data=[[r.get(c) for c in columns] for r in rows])})
    for key in ("plot", "pareto", "curves", "heatmap"):
        if out[key]:
            run.log({f"report/{Path(out[key]).stem}": wandb.Image(str(out[key]))})
    run.finish()


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir")
    parser.add_argument("--wandb-project", default=None,
                        help="also log the table and images to W&B (mode from WANDB_MODE)")
    parser.add_argument("--html", action="store_true",
                        help="also write report.html: one self-contained page (tables, plots)")
    args = parser.parse_args(argv)
    out = make_report(args.multirun_dir)
    if args.html:
        from loki_exp.report_html import write_html

        out["html"] = write_html(out, Path(args.multirun_dir))
    if args.wandb_project:
        log_to_wandb(out, args.wandb_project, Path(args.multirun_dir).name)
    print("\n".join(out["table"]))
    for key in ("plot", "pareto", "curves", "heatmap", "html"):
        if out.get(key):
            print(out[key])


if __name__ == "__main__":
    main()
