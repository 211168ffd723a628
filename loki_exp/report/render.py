"""The report as one list of blocks (a paragraph of markdown text, or a ``Table``), rendered to
``report.md`` and ``report.html`` from the same blocks; ``report.csv`` is the rows themselves.

A paragraph is written as it is into the markdown (a leading ``\\n`` is a blank line before it)
and as ``<p>`` per line into the HTML, with the two marks the report uses (`code`, **bold**).
"""

from __future__ import annotations

import base64
import csv
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loki_exp import atomic


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]
    align: list[str] | None = None  # per column, "---" (left) or "---:" (right)

    def markdown(self) -> list[str]:
        align = self.align or ["---"] * len(self.head)
        return (["| " + " | ".join(self.head) + " |", "| " + " | ".join(align) + " |"]
                + ["| " + " | ".join(row) + " |" for row in self.rows])

    def html(self) -> str:
        head = "".join(f"<th>{_inline(c)}</th>" for c in self.head)
        body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                       for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


Block = str | Table


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def with_interval(row: dict[str, Any], key: str, ci: str) -> str:
    """``value[*] [low, high]`` (``*``: the interval excludes 0), the value alone without one."""
    value = row.get(key)
    if value is None:
        return ""
    low, high = row.get(f"{ci}/ci_low"), row.get(f"{ci}/ci_high")
    if low is None or low != low:
        return fmt(value)
    star = "*" if low > 0 or high < 0 else ""
    return f"{value:.3g}{star} [{low:.3g}, {high:.3g}]"


def markdown_lines(blocks: list[Block]) -> list[str]:
    return [line for b in blocks for line in (b.markdown() if isinstance(b, Table) else [b])]


def write_csv(rows: list[dict[str, Any]], path: Path, fixed: list[str]) -> Path:
    """Every run, every metric: the fixed columns, then the metrics (``forgetting/avg`` last)."""
    metric_cols = sorted({k for r in rows for k in r if "/" in k})
    columns = fixed + [c for c in metric_cols if c != "forgetting/avg"] + ["forgetting/avg"]
    with atomic.writing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


CAPTIONS = {
    "curves": "Task gain against forgetting along training: every run's path (thin) and each "
              "arm's front (thick), the least forgetting any of its runs had at that gain.",
    "pareto": "Task gain against forgetting at the end of training, one front per arm "
              "(non-dominated runs joined); bars are 95% paired bootstrap intervals.",
    "plot": "Avg forgetting (percent, positive = forgot) against task gain, one point per run.",
    "heatmap": "Per layer, how many of the most-often highest / lowest KVA nodes sit there.",
}


def _inline(text: str) -> str:
    """Escape, then the two markdown marks the report uses: `code` and **bold**."""
    out = html.escape(text)
    parts = out.split("`")
    out = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def html_body(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Table):
            out.append(block.html())
            continue
        out += [f"<p>{_inline(line.strip())}</p>" for line in block.split("\n") if line.strip()]
    return "\n".join(out)


def write_html(report: dict[str, Any], root: Path) -> Path:
    """``report.html``: the report as one self-contained page (tables, and the plots embedded
    as data URIs), to send to someone who has neither the run dirs nor the README."""
    figures = []
    for key in ("curves", "pareto", "plot", "heatmap"):
        path = report.get(key)
        if path and Path(path).exists():
            data = base64.b64encode(Path(path).read_bytes()).decode()
            figures.append(f'<figure><img alt="{Path(path).stem}" '
                           f'src="data:image/png;base64,{data}"><figcaption>'
                           f"{html.escape(CAPTIONS[key])}</figcaption></figure>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loki_exp report: {html.escape(root.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 80em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }} figcaption {{ color: #444; }}
</style></head><body>
<h1>loki_exp report: {html.escape(str(root))}</h1>
<p>{len(report["rows"])} runs. Intervals: 95% paired bootstrap over the same items before and
after; <code>*</code>: the interval excludes 0. Avg forgetting: percent, lower is better.</p>
{html_body(report["blocks"])}
{''.join(figures)}
<script>/* for checks in a headless browser: how many images decoded */
window.addEventListener("load", () => {{ document.body.dataset.imagesLoaded =
  [...document.images].filter(i => i.complete && i.naturalWidth > 0).length; }});</script>
</body></html>
"""
    return atomic.write_text(root / "report.html", page)
