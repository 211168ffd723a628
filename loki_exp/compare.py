"""``python -m loki_exp.compare A B [--quota 10]``: how far two selections agree.

A and B are KVA stores (HDF5, ours or the original layout) or positions files (the original
``pos_json`` format, the published ones included), in any pairing. A store is turned into
rows with the same selection code the pipeline uses (``--quota``, ``--strategy``,
``--score``). Prints the overlap of the selected rows, overall and per layer, and, when both
are stores, the Spearman rank correlation of their per-node mean attributions.

Overlap is ``|A & B| / max(|A|, |B|)``: 1 only when the two selections are the same rows.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from loki_exp.cli import report_user_errors
from loki_exp.errors import LokiError
from loki_exp.kva.store import StoreView
from loki_exp.selection import ATTRIBUTION_STRATEGIES, SCORES, load_positions, select


@dataclass
class Side:
    path: Path
    positions: list[list[int]]
    mean_scores: np.ndarray | None  # [L, D] mean attribution over samples (stores only)


def _is_store(path: Path) -> bool:
    return path.is_file() and h5py.is_hdf5(path)


def load_side(path: str | Path, quota: float, strategy: str, score: str,
              grid: tuple[int, int] | None = None) -> Side:
    path = Path(path)
    if not path.exists():
        raise LokiError(f"{path} does not exist; expected a KVA store (.h5) or a positions file")
    if _is_store(path):
        with StoreView(path) as view:
            total = np.zeros(view.shape[1:], dtype=np.float64)

            def summed_chunks():  # one read of the store serves the selection and the mean
                for chunk in view.chunks():
                    total[...] += chunk.sum(0)
                    yield chunk

            positions = select(summed_chunks(), quota, strategy, score)
            mean = (total / view.shape[0]).astype(np.float32)
        return Side(path, positions, mean)
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LokiError(f"{path} is neither a KVA store (HDF5) nor a positions file (JSON)") from None
    n_layers = len(raw) if isinstance(raw, list) else 0
    n_nodes = grid[1] if grid else 1 + max((max(r) for r in raw if isinstance(r, list) and r
                                            and all(isinstance(i, int) for i in r)), default=0)
    return Side(path, load_positions(path, grid[0] if grid else n_layers, n_nodes), None)


def overlap(a: list[int], b: list[int]) -> float:
    if not a and not b:
        return 1.0
    return len(set(a) & set(b)) / max(len(a), len(b))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def compare(a: Side, b: Side) -> dict:
    if len(a.positions) != len(b.positions):
        raise LokiError(f"{a.path} has {len(a.positions)} layers, {b.path} has "
                        f"{len(b.positions)}: not selections of the same model")
    both = a.mean_scores is not None and b.mean_scores is not None
    if both and a.mean_scores.shape != b.mean_scores.shape:
        raise LokiError(f"{a.path} holds [L, D] = {list(a.mean_scores.shape)}, {b.path} "
                        f"{list(b.mean_scores.shape)}: not stores of the same model")
    flat_a = [(layer, i) for layer, rows in enumerate(a.positions) for i in rows]
    flat_b = [(layer, i) for layer, rows in enumerate(b.positions) for i in rows]
    layers = []
    for layer, (ra, rb) in enumerate(zip(a.positions, b.positions)):
        row = {"layer": layer, "rows_a": len(ra), "rows_b": len(rb), "overlap": overlap(ra, rb)}
        if both:
            row["spearman"] = spearman(a.mean_scores[layer], b.mean_scores[layer])
        layers.append(row)
    out = {"a": str(a.path), "b": str(b.path), "rows_a": len(flat_a), "rows_b": len(flat_b),
           "shared": len(set(flat_a) & set(flat_b)), "overlap": overlap(flat_a, flat_b),
           "layers": layers}
    if both:
        out["spearman"] = spearman(a.mean_scores, b.mean_scores)
    return out


def format_result(result: dict) -> str:
    lines = [f"A: {result['a']}", f"B: {result['b']}",
             f"overlap {result['overlap']:.4f} ({result['shared']} shared of "
             f"{result['rows_a']} / {result['rows_b']} rows)"]
    if "spearman" in result:
        lines.append(f"spearman {result['spearman']:.4f} (mean attribution per node)")
    has_rho = "spearman" in result
    lines.append("layer  rows_a  rows_b  overlap" + ("  spearman" if has_rho else ""))
    for row in result["layers"]:
        lines.append(f"{row['layer']:>5}  {row['rows_a']:>6}  {row['rows_b']:>6}  "
                     f"{row['overlap']:>7.4f}" + (f"  {row['spearman']:>8.4f}" if has_rho else ""))
    return "\n".join(lines)


@report_user_errors
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="KVA store (.h5) or positions file (.json)")
    parser.add_argument("b", help="KVA store (.h5) or positions file (.json)")
    parser.add_argument("--quota", type=float, default=10.0,
                        help="percent of rows selected from a store (default 10)")
    parser.add_argument("--strategy", default="layer_balanced", choices=list(ATTRIBUTION_STRATEGIES))
    parser.add_argument("--score", default="signed", choices=list(SCORES))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    first = load_side(args.a, args.quota, args.strategy, args.score)
    grid = (first.mean_scores.shape if first.mean_scores is not None else None)
    second = load_side(args.b, args.quota, args.strategy, args.score, grid)
    if grid is None and second.mean_scores is not None:  # check A's rows against B's grid
        first = load_side(args.a, args.quota, args.strategy, args.score, second.mean_scores.shape)
    result = compare(first, second)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return result


if __name__ == "__main__":
    main()
