"""A run's ``curve.jsonl``: its name and how it is read, shared by the writer
(``evaluation/curves.py``, which needs torch and Lightning) and the report (which needs
neither)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "curve.jsonl"


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``curve.jsonl``, one per line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
