"""Select trainable down_proj rows from KVA attributions (docs/method.md "Select").

``q`` in (0, 100] is the percent of all ``L x D`` nodes made trainable, ``T = floor(q/100 L D)``.

- ``layer_balanced``: ``k = floor(T / L)`` per layer; every sample votes for its ``k``
  lowest-scored nodes of each layer; each layer keeps its ``k`` most-voted nodes.
- ``global_lowest`` / ``global_highest``: every sample votes for its ``T`` lowest / highest
  nodes over all layers together; the ``T`` most-voted nodes are kept.
- ``random`` (the control for KVA's choice, no attributions): ``k = floor(T / L)`` rows per
  layer, as ``layer_balanced``, drawn uniformly without replacement with ``strategy.seed``.

Tie-breaking (deterministic, unlike the original's numpy order):
 1. within a sample, equal scores are ranked by node index (stable sort);
 2. between nodes with equal vote counts, the one with the lower summed score across
    samples wins for lowest-selection (higher for ``global_highest``), then the lower index.

Attributions stream in chunks of samples (``StoreView.chunks``), so memory stays bounded
at full-MMLU Llama-8B scale: only [L, D] vote counts and score sums are kept.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from loki_exp import atomic
from loki_exp.errors import LokiError

STRATEGIES = ("layer_balanced", "global_lowest", "global_highest", "random")
# Strategies that rank nodes by their KVA attributions (random needs none).
ATTRIBUTION_STRATEGIES = STRATEGIES[:3]
SCORES = ("signed", "abs")


def check_quota(quota: object) -> None:
    if isinstance(quota, bool) or not isinstance(quota, (int, float)) or not 0 < quota <= 100:
        raise LokiError(f"quota={quota!r} is out of range; expected a number in (0, 100]")


def node_budget(quota: float, n_layers: int, n_nodes: int) -> int:
    """``T = floor(q/100 * L * D)``."""
    check_quota(quota)
    # Rounded to 9 digits first so that e.g. 10% of 24*896 is 2150, not 2150.3999...
    return math.floor(round(quota / 100 * n_layers * n_nodes, 9))


def _as_chunks(scores: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    if isinstance(scores, np.ndarray):
        if scores.ndim != 3:
            raise LokiError(f"attributions have shape {scores.shape}, expected [N, L, D]")
        return [scores]
    return scores


def _votes(chunks: Iterable[np.ndarray], per_layer: bool, k: int, highest: bool, score: str):
    counts = sums = None
    n_samples = 0
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.float64)
        if score == "abs":
            chunk = np.abs(chunk)
        n, L, D = chunk.shape
        if counts is None:
            counts, sums = np.zeros(L * D, np.int64), np.zeros(L * D, np.float64)
        keyed = -chunk if highest else chunk
        if per_layer:
            order = np.argsort(keyed, axis=2, kind="stable")[:, :, :k]  # [n, L, k]
            flat = (order + (np.arange(L) * D)[None, :, None]).ravel()
        else:
            order = np.argsort(keyed.reshape(n, L * D), axis=1, kind="stable")[:, :k]
            flat = order.ravel()
        counts += np.bincount(flat, minlength=L * D)
        sums += chunk.reshape(n, L * D).sum(axis=0)
        n_samples += n
    if counts is None or n_samples == 0:
        raise LokiError("no attributions to select from (the store holds 0 samples)")
    return counts, sums, L, D


def _rank(counts: np.ndarray, sums: np.ndarray, highest: bool) -> np.ndarray:
    """Node order: most votes, then lowest (highest) summed score, then lowest index."""
    index = np.arange(counts.size)
    return np.lexsort((index, -sums if highest else sums, -counts))


def select(scores: np.ndarray | Iterable[np.ndarray], quota: float,
           strategy: str = "layer_balanced", score: str = "signed") -> list[list[int]]:
    """Trainable rows per layer, each list sorted ascending."""
    if strategy not in ATTRIBUTION_STRATEGIES:
        raise LokiError(f"strategy={strategy!r} is not known; expected one of "
                        f"{list(ATTRIBUTION_STRATEGIES)} (random: select_random)")
    if score not in SCORES:
        raise LokiError(f"strategy.score={score!r} is not known; expected one of {list(SCORES)}")
    chunks = iter(_as_chunks(scores))
    first = next(chunks, None)
    if first is None:
        raise LokiError("no attributions to select from (the store holds 0 samples)")
    _, L, D = np.shape(first)
    total = node_budget(quota, L, D)
    highest = strategy == "global_highest"

    def all_chunks():
        yield first
        yield from chunks

    if strategy == "layer_balanced":
        k = total // L
        counts, sums, L, D = _votes(all_chunks(), True, k, False, score)
        positions = []
        for layer in range(L):
            sl = slice(layer * D, (layer + 1) * D)
            keep = _rank(counts[sl], sums[sl], highest=False)[:k]
            positions.append(sorted(int(i) for i in keep))
        return positions
    counts, sums, L, D = _votes(all_chunks(), False, total, highest, score)
    keep = _rank(counts, sums, highest)[:total]
    positions = [[] for _ in range(L)]
    for flat in sorted(int(i) for i in keep):
        positions[flat // D].append(flat % D)
    return positions


def select_layer_balanced(scores, quota: float, score: str = "signed") -> list[list[int]]:
    return select(scores, quota, "layer_balanced", score)


def select_random(quota: float, n_layers: int, n_nodes: int, seed: int) -> list[list[int]]:
    """``floor(T / L)`` rows per layer (as ``layer_balanced`` takes), drawn uniformly without
    replacement by numpy's ``default_rng(seed)``: the same rows for a seed on any machine."""
    k = node_budget(quota, n_layers, n_nodes) // n_layers
    rng = np.random.default_rng(seed)
    return [sorted(int(i) for i in rng.choice(n_nodes, size=k, replace=False))
            for _ in range(n_layers)]


# -- positions JSON (the original pos_json format: a list of L lists of row indices) -------

def validate_positions(positions: object, n_layers: int, n_nodes: int,
                       source: str = "positions") -> list[list[int]]:
    """Check the original format against a model's [L, D]; return sorted lists."""
    if not isinstance(positions, list) or not all(isinstance(p, list) for p in positions):
        raise LokiError(f"{source}: expected a JSON list of {n_layers} lists of row indices")
    if len(positions) != n_layers:
        raise LokiError(f"{source}: has {len(positions)} layer lists, the model has {n_layers} "
                        "layers")
    out = []
    for layer, rows in enumerate(positions):
        bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int)]
        if bad:
            raise LokiError(f"{source}: layer {layer} has non-integer entries {bad[:3]}")
        outside = [r for r in rows if not 0 <= r < n_nodes]
        if outside:
            raise LokiError(f"{source}: layer {layer} has indices {outside[:3]} outside "
                            f"[0, {n_nodes})")
        if len(set(rows)) != len(rows):
            dup = sorted({r for r in rows if rows.count(r) > 1})
            raise LokiError(f"{source}: layer {layer} repeats indices {dup[:3]}")
        out.append(sorted(rows))
    return out


def save_positions(positions: list[list[int]], path: str | os.PathLike) -> Path:
    return atomic.write_json(path, [sorted(int(i) for i in rows) for rows in positions])


def load_positions(path: str | os.PathLike, n_layers: int, n_nodes: int) -> list[list[int]]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LokiError(f"positions file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise LokiError(f"positions file {path} is not valid JSON ({err})") from None
    return validate_positions(data, n_layers, n_nodes, source=str(path))
