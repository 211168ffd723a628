"""Saving the report's figures: written atomically, then freed."""

from __future__ import annotations

from pathlib import Path

from loki_exp import atomic


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic.writing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
