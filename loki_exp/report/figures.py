"""The report's figures: ``curves.png`` (paths along training and each arm's front),
``pareto.png``, ``forgetting_vs_task.png`` and ``kva_heatmap.png``; each written atomically,
then freed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from loki_exp import atomic
from loki_exp.report.collect import task_axis
from loki_exp.report.matched import MEASURES, PairedValues, best_gain, front_at
from loki_exp.report.render import fmt


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic.writing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


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
            ax.annotate(f"lr {fmt(r.get('lr'))}", (x, y), textcoords="offset points",
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
                ax.annotate(f"lr {fmt(r.get('lr'))}", (x, y), textcoords="offset points",
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


def plot_curves(values: PairedValues, root: Path) -> Path | None:
    """``curves.png``: every run's path (task gain against KL and against Avg bpb forgetting,
    one marker per evaluation point, lr at its end) and each method's front (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    curves, point = values.curves, values.point
    measures = [m for m in MEASURES if curves and all(m in point[c.run] for c in curves)]
    if not measures:
        return None
    labels = sorted({c.label for c in curves})
    fig, axes = plt.subplots(1, len(measures), figsize=(6.4 * len(measures), 4.8), squeeze=False)
    for ax, measure in zip(axes[0], measures):
        for n, label in enumerate(labels):
            color = f"C{n}"
            mine = [c for c in curves if c.label == label]
            for c in mine:
                v = point[c.run]
                ax.plot(v["gain"], v[measure], "-o", color=color, alpha=0.45, ms=3, lw=0.9)
                for step, x, y in zip(c.steps, v["gain"], v[measure]):
                    ax.annotate(f"{step}", (x, y), textcoords="offset points", xytext=(-4, -9),
                                fontsize=6, color=color, alpha=0.7)
                lr = f"lr {c.lr:g}" if c.lr is not None else c.run
                ax.annotate(lr, (v["gain"][-1], v[measure][-1]), textcoords="offset points",
                            xytext=(3, 3), fontsize=7, color=color)
            top = best_gain(values, label)
            grid = np.linspace(0, top, 60) if top > 0 else np.array([0.0])
            front = [front_at([point[c.run] for c in mine], measure, g) for g in grid]
            ax.plot(grid, front, "-", color=color, lw=2.4, label=f"{label} (front)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel("task gain: gold-answer bits per byte, % below base")
        ax.set_ylabel(MEASURES[measure] + " (lower is better)")
        ax.legend(fontsize=8)
    fig.suptitle("Learning vs forgetting along training (thin: runs, points marked with their "
                 "step; thick: each arm's front)")
    fig.tight_layout()
    return save_figure(fig, root / "curves.png")
