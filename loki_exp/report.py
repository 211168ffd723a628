"""``python -m loki_exp.report <multirun dir>``: one table of every run and the paper's plots.

Reads each job's ``run.json`` / ``metrics.json`` and writes into the multirun dir:
``report.csv`` and ``report.md`` (method, strategy, quota, trainable parameters, task
score, each benchmark, Avg forgetting), ``forgetting_vs_task.png`` (one labelled point per
run, a method's quotas joined by a line) and ``kva_heatmap.png`` (per layer, how many of
the most-often highest / lowest nodes sit there; the paper's Figure 2) when a run has a
KVA store.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from loki_exp.errors import LokiError, report_user_errors


def collect_runs(root: Path) -> list[dict[str, Any]]:
    rows = []
    for record_path in sorted(root.rglob("run.json")):
        record = json.loads(record_path.read_text())
        cfg = record["config"]
        metrics = record.get("metrics") or {}
        row = {"run": str(record_path.parent.relative_to(root)), "method": cfg["method"]["name"],
               "strategy": cfg["strategy"]["name"], "quota": cfg["quota"],
               "trainable_parameters": (record.get("implant") or {}).get("trainable_parameters"),
               "kva_store": record.get("kva_store")}
        row.update(metrics)
        rows.append(row)
    if not rows:
        raise LokiError(f"{root} holds no run.json: expected a Hydra multirun dir of loki_exp runs")
    return rows


def _task_key(rows: list[dict[str, Any]]) -> str | None:
    keys = sorted({k for r in rows for k in r if k.startswith("task/") and k.endswith("/after")})
    return keys[0] if keys else None


def write_table(rows: list[dict[str, Any]], root: Path) -> list[str]:
    fixed = ["run", "method", "strategy", "quota", "trainable_parameters"]
    metric_cols = sorted({k for r in rows for k in r if "/" in k and not k.endswith("/delta")})
    columns = fixed + [c for c in metric_cols if c != "forgetting/avg"] + ["forgetting/avg"]
    with open(root / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    short = fixed[1:] + [c for c in columns if c.endswith("/after") or c == "forgetting/avg"]
    task_before = _task_key(rows)

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(short) + " |", "|" + " --- |" * len(short)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in short) + " |" for r in rows]
    if task_before:
        base = next((r.get(task_before.replace("/after", "/before")) for r in rows), None)
        lines.append(f"\nBase model: {task_before.replace('/after', '')} = {fmt(base)}")
    (root / "report.md").write_text("\n".join(lines) + "\n")
    return lines


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    ax.set_xlabel("layer")
    ax.set_title("Where the most-often highest / lowest KVA nodes sit")
    fig.colorbar(image, ax=ax, label="nodes")
    fig.tight_layout()
    path = root / "kva_heatmap.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_report(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    if not root.is_dir():
        raise LokiError(f"report: {root} is not a directory (expected a multirun dir)")
    rows = collect_runs(root)
    table = write_table(rows, root)
    plot = plot_forgetting_vs_task(rows, root)
    store = next((r["kva_store"] for r in rows if r.get("kva_store")
                  and Path(r["kva_store"]).exists()), None)
    heatmap = plot_kva_heatmap(store, root) if store else None
    return {"rows": rows, "table": table, "plot": plot, "heatmap": heatmap}


def log_to_wandb(out: dict[str, Any], project: str, group: str) -> None:
    """The table and both images as one W&B run of the sweep's group."""
    import wandb

    rows = out["rows"]
    columns = sorted({k for r in rows for k in r})
    run = wandb.init(project=project, group=group, job_type="report", name=f"{group}-report")
    run.log({"report/table": wandb.Table(columns=columns,
                                         data=[[r.get(c) for c in columns] for r in rows])})
    for key in ("plot", "heatmap"):
        if out[key]:
            run.log({f"report/{Path(out[key]).stem}": wandb.Image(str(out[key]))})
    run.finish()


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir")
    parser.add_argument("--wandb-project", default=None,
                        help="also log the table and images to W&B (mode from WANDB_MODE)")
    args = parser.parse_args(argv)
    out = make_report(args.multirun_dir)
    if args.wandb_project:
        log_to_wandb(out, args.wandb_project, Path(args.multirun_dir).name)
    print("\n".join(out["table"]))
    for key in ("plot", "heatmap"):
        if out[key]:
            print(out[key])


if __name__ == "__main__":
    main()
