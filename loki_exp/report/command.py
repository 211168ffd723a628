"""``python -m loki_exp.report <multirun dir> [--html] [--wandb-project P]``: the report,
printed, optionally as one HTML page and as a W&B run of the sweep's group."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loki_exp.cli import report_user_errors
from loki_exp.report import make_report
from loki_exp.report.render import write_html


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
    parser = argparse.ArgumentParser(description="Tables and plots of a multirun dir of loki_exp runs")
    parser.add_argument("multirun_dir")
    parser.add_argument("--wandb-project", default=None,
                        help="also log the table and images to W&B (mode from WANDB_MODE)")
    parser.add_argument("--html", action="store_true",
                        help="also write report.html: one self-contained page (tables, plots)")
    args = parser.parse_args(argv)
    out = make_report(args.multirun_dir)
    if args.html:
        out["html"] = write_html(out, Path(args.multirun_dir))
    if args.wandb_project:
        log_to_wandb(out, args.wandb_project, Path(args.multirun_dir).name)
    print("\n".join(out["table"]))
    for key in ("plot", "pareto", "curves", "heatmap", "html"):
        if out.get(key):
            print(out[key])

