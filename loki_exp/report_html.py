"""``report.html``: the report as one self-contained page (tables, and the plots embedded as
data URIs), to send to someone who has neither the run dirs nor the README."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from loki_exp import atomic

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


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(lines: list[str]) -> str:
    """The report's markdown (paragraphs and pipe tables) as HTML."""
    out, i = [], 0
    lines = [part for line in lines for part in line.split("\n")]
    while i < len(lines):
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            head = "".join(f"<th>{_inline(c)}</th>" for c in _cells(line))
            body, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>"
                                             for c in _cells(lines[i])) + "</tr>")
                i += 1
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
                       "</tbody></table>")
            continue
        if line.strip():
            out.append(f"<p>{_inline(line.strip())}</p>")
        i += 1
    return "\n".join(out)


def write_html(report: dict[str, Any], root: Path) -> Path:
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
{markdown_to_html(report["table"])}
{''.join(figures)}
<script>/* for checks in a headless browser: how many images decoded */
window.addEventListener("load", () => {{ document.body.dataset.imagesLoaded =
  [...document.images].filter(i => i.complete && i.naturalWidth > 0).length; }});</script>
</body></html>
"""
    return atomic.write_text(root / "report.html", page)
