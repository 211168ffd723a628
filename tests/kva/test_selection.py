"""Selection strategies against a brute-force reference; the positions JSON format."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loki_exp.errors import LokiError
from loki_exp.selection import (
    load_positions,
    node_budget,
    save_positions,
    select,
    validate_positions,
)
from tests.support.paths import SHARED_DATA, needs_shared_data


def brute_force(scores, quota, strategy, score="signed"):
    """Loops over samples, layers and nodes; ties as documented in loki_exp.selection."""
    scores = np.abs(scores) if score == "abs" else scores
    n, L, D = scores.shape
    total = math.floor(round(quota / 100 * L * D, 9))
    votes = {}
    sums = {}
    for s in range(n):
        for layer in range(L):
            for node in range(D):
                sums[(layer, node)] = sums.get((layer, node), 0.0) + float(scores[s, layer, node])
    highest = strategy == "global_highest"
    for s in range(n):
        if strategy == "layer_balanced":
            k = total // L
            for layer in range(L):
                ranked = sorted(range(D), key=lambda j: (scores[s, layer, j], j))
                for j in ranked[:k]:
                    votes[(layer, j)] = votes.get((layer, j), 0) + 1
        else:
            nodes = [(layer, j) for layer in range(L) for j in range(D)]
            sign = -1 if highest else 1
            ranked = sorted(nodes, key=lambda x: (sign * scores[s][x], x[0] * D + x[1]))
            for x in ranked[:total]:
                votes[x] = votes.get(x, 0) + 1
    sign = -1 if highest else 1

    def order(x):
        return (-votes.get(x, 0), sign * sums[x], x[0] * D + x[1])

    if strategy == "layer_balanced":
        k = total // L
        return [sorted(j for _, j in sorted(((layer, j) for j in range(D)), key=order)[:k])
                for layer in range(L)]
    keep = sorted(((layer, j) for layer in range(L) for j in range(D)), key=order)[:total]
    out = [[] for _ in range(L)]
    for layer, j in sorted(keep):
        out[layer].append(j)
    return out


@pytest.mark.parametrize("strategy", ["layer_balanced", "global_lowest", "global_highest"])
@pytest.mark.parametrize("quota", [5, 10, 33.3, 100])
@pytest.mark.parametrize("score", ["signed", "abs"])
def test_strategies_equal_brute_force(strategy, quota, score):
    rng = np.random.default_rng(int(quota * 10))
    scores = rng.normal(size=(7, 3, 40)).astype(np.float32)
    scores[:, :, :5] = 0.0  # exact ties inside every sample
    expected = brute_force(scores, quota, strategy, score)
    assert select(scores, quota, strategy, score) == expected
    # Streaming in chunks of samples gives the same answer.
    assert select(iter([scores[:3], scores[3:5], scores[5:]]), quota, strategy, score) == expected


def test_layer_balanced_counts_and_signed_lowest():
    scores = np.zeros((2, 2, 10), np.float32)
    scores[:, 0, 7] = -5.0  # strongly negative: always selected first in layer 0
    scores[:, 1, 2] = -1.0
    positions = select(scores, 10, "layer_balanced")  # T = 2, k = 1
    assert positions == [[7], [2]]
    assert select(scores, 10, "layer_balanced", score="abs") == [[0], [0]]
    # global_highest on |score| spends the whole budget wherever the largest values are.
    assert select(scores, 10, "global_highest", score="abs") == [[7], [2]]


def test_budget_matches_the_paper():
    assert node_budget(10, 32, 4096) // 32 == 409  # Llama-3.1-8B: 409 rows per layer
    assert node_budget(10, 24, 896) // 24 == 89
    for bad in (0, -1, 100.5, "10", True):
        with pytest.raises(LokiError, match="out of range; expected a number in"):
            node_budget(bad, 2, 4)


def test_bad_strategy_and_score():
    scores = np.zeros((1, 2, 4))
    with pytest.raises(LokiError, match="strategy='random' is not known"):
        select(scores, 10, "random")
    with pytest.raises(LokiError, match="strategy.score='square' is not known"):
        select(scores, 10, "layer_balanced", "square")
    with pytest.raises(LokiError, match="0 samples"):
        select(iter([]), 10)


@needs_shared_data
@pytest.mark.parametrize("model,layers,d_model,quotas", [
    ("Qwen2.5-0.5B-Instruct", 24, 896, (5, 10, 20, 30)),
    ("Llama-3.1-8B-Instruct", 32, 4096, (10, 20, 30)),
])
def test_original_published_positions_validate(model, layers, d_model, quotas):
    for q in quotas:
        path = SHARED_DATA / "original_pos_json" / model / f"{q}.json"
        positions = load_positions(path, layers, d_model)
        assert len(positions) == layers
        assert {len(p) for p in positions} == {node_budget(q, layers, d_model) // layers}
        assert all(p == sorted(p) and len(set(p)) == len(p) for p in positions)
        # The loader keeps the rows, only sorts them.
        raw = json.loads(path.read_text())
        assert [sorted(r) for r in raw] == positions
        with pytest.raises(LokiError, match=f"has {layers} layer lists, the model has 3 layers"):
            load_positions(path, 3, d_model)


@pytest.mark.parametrize("positions,match", [
    ([[0, 1], [2]], "has 2 layer lists, the model has 3"),
    ([[0], [1], [64]], r"indices \[64\] outside \[0, 64\)"),
    ([[0], [-1], [2]], r"indices \[-1\] outside"),
    ([[0, 0], [1], [2]], r"repeats indices \[0\]"),
    ([[0], [1.5], [2]], r"non-integer entries \[1.5\]"),
    ([[0], ["3"], [2]], "non-integer entries"),
    ({"layer0": [1]}, "expected a JSON list of 3 lists"),
])
def test_bad_positions(positions, match):
    with pytest.raises(LokiError, match=match):
        validate_positions(positions, 3, 64)


def test_positions_round_trip_and_bad_files(tmp_path):
    path = save_positions([[3, 1], [0], []], tmp_path / "p.json")
    assert load_positions(path, 3, 4) == [[1, 3], [0], []]
    (tmp_path / "bad.json").write_text("[[1, 2]")
    with pytest.raises(LokiError, match="is not valid JSON"):
        load_positions(tmp_path / "bad.json", 1, 4)
    with pytest.raises(LokiError, match="does not exist"):
        load_positions(tmp_path / "missing.json", 1, 4)
