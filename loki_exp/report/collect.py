"""The runs of a study: each job's ``run.json`` / ``metrics.json`` / ``items.json`` /
``curve.jsonl`` read into one row per run, its arm, and the task axis the rows share."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from loki_exp.errors import LokiError
from loki_exp.evaluation.curve_records import FILE as CURVE_FILE
from loki_exp.report.matched import Curve, load_curve

log = logging.getLogger(__name__)


def read_json(path: Path) -> Any:
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
    from loki_exp.implant.methods import REGISTRY

    rows = []
    for record_path in sorted(root.rglob("run.json")):
        record = read_json(record_path)
        if not isinstance(record, dict) or "config" not in record:
            continue
        cfg = record["config"]
        metrics = record.get("metrics") or {}
        metrics_path = record_path.parent / "metrics.json"
        if metrics_path.exists():  # the evaluate stage's own file, if the record lacks them
            metrics = read_json(metrics_path)
            if metrics is None:
                continue
        here = record_path.parent
        method = cfg["method"]["name"]
        # a method no longer registered (a record from another version) selects nothing
        selects = (method in REGISTRY and REGISTRY[method].selects_rows
                   and not cfg.get("positions_file"))
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


def task_items_key(rows: list[dict[str, Any]]) -> str | None:
    """The per-item key that the task's significance test pairs."""
    axis = task_axis(rows)
    if axis is None:
        return None
    if axis[0].endswith("/reduction_pct"):
        return axis[0].removesuffix("/reduction_pct")
    return axis[0].removesuffix("/delta")


def load_items(row: dict[str, Any]) -> dict[str, Any]:
    return (read_json(Path(row["items"])) or {}) if row.get("items") else {}


def run_name(row: dict[str, Any]) -> str:
    """``3: loki q=10 random, seed 42, rows 1``: a run as the tables name it."""
    rows_seed = row.get("strategy_seed")
    return (f"{row['run']}: {row['label']}, seed {row.get('seed')}"
            + (f", rows {rows_seed}" if rows_seed is not None else ""))


def run_curves(rows: list[dict[str, Any]]) -> list[Curve]:
    curves = [load_curve(Path(r["curve"]), r["run"], r["label"], r.get("lr"),
                         (r["method"], r.get("quota"), r.get("lr")), run_name(r))
              for r in rows if r.get("curve")]
    return [c for c in curves if c is not None]
