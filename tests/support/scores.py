"""Hand-made model scores in the evaluate stage's format."""

from __future__ import annotations


def bfcl_category_scores(simple: list[float], irrelevance: list[float]) -> dict:
    """A model's scores as the evaluate stage keeps a BFCL measure that is a mean over
    categories (here the leaderboard's, over two): no item list of its own, per-item values
    under ``<measure>/<category>``."""
    acc = {"leaderboard_accuracy/simple": sum(simple) / len(simple),
           "leaderboard_accuracy/irrelevance": sum(irrelevance) / len(irrelevance)}
    return {"bench": {}, "bpb": {}, "task": {**acc, "leaderboard_accuracy": sum(acc.values()) / 2},
            "items": {"task/bfcl/leaderboard_accuracy/simple": simple,
                      "task/bfcl/leaderboard_accuracy/irrelevance": irrelevance}}
