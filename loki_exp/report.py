"""``python -m loki_exp.report <multirun dir>``: one table of every run and the paper's plots.

Reads each job's ``run.json`` / ``metrics.json`` / ``items.json`` and writes into the
multirun dir: ``report.csv`` (every metric) and ``report.md`` (method, quota, lr, the task's
gain and each forgetting measure with its 95% paired-bootstrap interval; then every pair of
runs of different methods whose task gain or Avg forgetting differs significantly on the
same items), ``forgetting_vs_task.png`` (one labelled point per run, a method's quotas joined
by a line), ``pareto.png`` (task gain against Avg forgetting and against KL drift, CI bars,
each method's non-dominated runs joined: its front) and ``kva_heatmap.png`` (per layer, how
many of the most-often highest / lowest nodes sit there; the paper's Figure 2) when a run
has a KVA store.
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

log = logging.getLogger(__name__)


def _read_json(path: Path) -> Any:
    """The file's JSON, or None (with a warning naming it) when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("report: skipping %s: %s", path, err)
        return None


def collect_runs(root: Path) -> list[dict[str, Any]]:
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
        items = record_path.parent / "items.json"
        row = {"run": str(record_path.parent.relative_to(root)), "method": cfg["method"]["name"],
               "strategy": cfg["strategy"]["name"], "quota": cfg["quota"],
               "lr": cfg["method"].get("lr"), "items": str(items) if items.exists() else None,
               "forgetting_metric": cfg.get("eval", {}).get("forgetting_metric"),
               "trainable_parameters": (record.get("implant") or {}).get("trainable_parameters"),
               "kva_store": record.get("kva_store")}
        row.update(metrics)
        rows.append(row)
    if not rows:
        raise LokiError(f"{root} holds no readable run.json: expected a Hydra multirun dir of "
                        "loki_exp runs")
    return rows


def _task_key(rows: list[dict[str, Any]]) -> str | None:
    """The task's overall score (``task/<name>/<metric>/after``), not a category's."""
    keys = sorted({k for r in rows for k in r if k.startswith("task/") and k.endswith("/after")},
                  key=lambda k: (k.count("/"), k))
    return keys[0] if keys else None


def write_table(rows: list[dict[str, Any]], root: Path) -> list[str]:
    fixed = ["run", "method", "strategy", "quota", "lr", "trainable_parameters"]
    metric_cols = sorted({k for r in rows for k in r if "/" in k})
    columns = fixed + [c for c in metric_cols if c != "forgetting/avg"] + ["forgetting/avg"]
    with atomic.writing(root / "report.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    task = _task_key(rows)
    delta = task.replace("/after", "/delta") if task else None
    # (column, the value's key, the key its interval hangs on)
    summary = [("task gain", delta, delta),
               ("Avg forgetting %", "forgetting/avg", "forgetting/avg"),
               ("Avg, benchmarks only %", "forgetting/avg_benchmarks", "forgetting/avg_benchmarks"),
               ("KL drift", "drift/kl/after", "drift/kl"),
               ("format damage", "drift/format_damage/delta", "drift/format_damage/delta")]
    summary = [s for s in summary if s[1] and any(s[1] in r for r in rows)]
    head = ["method", "quota", "lr"] + [label for label, _, _ in summary]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["method"], _fmt(r["quota"]), _fmt(r.get("lr"))]
        cells += [_with_interval(r, key, ci) for _, key, ci in summary]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nIntervals: 95% paired bootstrap over the same items before and after "
                 "(`*`: excludes 0). Avg forgetting: lower is better.")
    if task:
        base = next((r.get(task.replace("/after", "/before")) for r in rows), None)
        lines.append(f"Base model: {task.replace('/after', '')} = {_fmt(base)}")
    lines += significant_differences(rows, task)
    atomic.write_text(root / "report.md", "\n".join(lines) + "\n")
    return lines


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


def significant_differences(rows: list[dict[str, Any]], task: str | None) -> list[str]:
    """Pairs of runs of different methods whose task gain or Avg forgetting differ, with the
    95% paired bootstrap interval of the difference over the same items."""
    from loki_exp.evaluation.bootstrap import (
        avg_difference_ci,
        paired_difference_ci,
        significant,
        stratified_delta_ci,
    )
    from loki_exp.evaluation.scores import category_keys

    items = {r["run"]: _load_items(r) for r in rows}
    task_item = task.removesuffix("/after") if task else None
    found = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["method"] == b["method"] or not items[a["run"]] or not items[b["run"]]:
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
        return ["\nNo difference between runs of different methods is significant (95%)."]
    out = ["\nSignificant differences between methods (95% paired bootstrap):\n",
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
    quota = f" q={row['quota']:g}" if str(row["method"]).startswith("loki") else ""
    return f"{row['method']}{quota} lr={_fmt(row.get('lr'))}"


def plot_forgetting_vs_task(rows: list[dict[str, Any]], root: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = _task_key(rows)
    points = [r for r in rows if task and r.get(task) is not None
              and r.get("forgetting/avg") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in sorted({r["method"] for r in points}):
        mine = sorted((r for r in points if r["method"] == method), key=lambda r: r["quota"])
        gain = [r[task] - r[task.replace("/after", "/before")] for r in mine]
        forget = [r["forgetting/avg"] for r in mine]
        ax.plot(gain, forget, marker="o", label=method)
        for r, x, y in zip(mine, gain, forget):
            label = f"{method} q={r['quota']:g}" if method.startswith("loki") else method
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"task gain ({task.removesuffix('/after')}: after - before)")
    ax.set_ylabel("Avg forgetting, % (lower is better)")
    ax.set_title("Forgetting vs task gain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = root / "forgetting_vs_task.png"
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Write a figure atomically and free it."""
    import matplotlib.pyplot as plt

    with atomic.writing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


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
    """Task gain against Avg forgetting (and against KL drift where measured), one front per
    method, 95% interval bars on both axes, as Biderman et al. (2024) compare methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = _task_key(rows)
    if not task:
        return None
    gain_key = task.replace("/after", "/delta")
    panels = [(k, ci, label) for k, ci, label in
              [("forgetting/avg", "forgetting/avg", "Avg forgetting, % of base (lower is better)"),
               ("drift/kl/after", "drift/kl", "KL(base || tuned), nats/token (lower is better)")]
              if any(r.get(k) is not None for r in rows)]
    points = [r for r in rows if r.get(gain_key) is not None]
    if not points or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    for ax, (key, ci, ylabel) in zip(axes[0], panels):
        for n, method in enumerate(sorted({r["method"] for r in points})):
            mine = [r for r in points if r["method"] == method and r.get(key) is not None]
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
                    label=f"{method} (front)")
            for r, (x, y) in zip(mine, xy):
                ax.annotate(f"lr {_fmt(r.get('lr'))}", (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=color)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel(f"task gain: {gain_key.removesuffix('/delta')} after - before (accuracy)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("Learning vs forgetting, one front per method (bars: 95% paired bootstrap)")
    fig.tight_layout()
    path = root / "pareto.png"
    return _save(fig, path)


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
    path = root / "kva_heatmap.png"
    return _save(fig, path)


def make_report(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    if not root.is_dir():
        raise LokiError(f"report: {root} is not a directory (expected a multirun dir)")
    rows = collect_runs(root)
    table = write_table(rows, root)
    plot = plot_forgetting_vs_task(rows, root)
    pareto = plot_pareto(rows, root)
    store = next((r["kva_store"] for r in rows if r.get("kva_store")
                  and Path(r["kva_store"]).exists()), None)
    heatmap = plot_kva_heatmap(store, root) if store else None
    return {"rows": rows, "table": table, "plot": plot, "pareto": pareto, "heatmap": heatmap}


def log_to_wandb(out: dict[str, Any], project: str, group: str) -> None:
    """The table and both images as one W&B run of the sweep's group."""
    import wandb

    rows = out["rows"]
    columns = sorted({k for r in rows for k in r})
    run = wandb.init(project=project, group=group, job_type="report", name=f"{group}-report")
    run.log({"report/table": wandb.Table(columns=columns,
                                         data=[[r.get(c) for c in columns] for r in rows])})
    for key in ("plot", "pareto", "heatmap"):
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
    for key in ("plot", "pareto", "heatmap", "html"):
        if out.get(key):
            print(out[key])


if __name__ == "__main__":
    main()
