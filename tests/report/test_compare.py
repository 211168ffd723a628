"""``python -m loki_exp.compare``: overlap of two selections and rank correlation of two stores."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from loki_exp.compare import main
from loki_exp.selection import select
from tests.support.paths import SHARED_DATA, needs_shared_data


def _store(path, scores):
    with h5py.File(path, "w") as f:  # the original code's layout
        f.create_dataset("dataset", data=scores.astype(np.float16))
    return path


def test_two_stores_a_store_and_its_positions(tmp_path, capsys):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 3, 40)).astype(np.float16).astype(np.float32)
    flipped = scores.copy()
    flipped[:, 2] *= -1  # layer 2 ranks reversed, layers 0-1 unchanged
    a, b = _store(tmp_path / "a.h5", scores), _store(tmp_path / "b.h5", flipped)
    result = main([str(a), str(b), "--quota", "25"])
    assert result["rows_a"] == result["rows_b"] == 3 * 10
    assert [row["overlap"] for row in result["layers"][:2]] == [1.0, 1.0]
    assert [row["spearman"] for row in result["layers"]] == pytest.approx([1.0, 1.0, -1.0])
    # Layer 2: B keeps A's 10 most-voted highest rows; by hand from A's own votes.
    lowest = select(flipped, 25)[2]
    assert result["layers"][2]["overlap"] == len(set(lowest) & set(select(scores, 25)[2])) / 10
    assert result["overlap"] == pytest.approx((20 + result["layers"][2]["overlap"] * 10) / 30)
    out = capsys.readouterr().out
    assert "overlap" in out and "spearman" in out

    positions = tmp_path / "25.json"
    positions.write_text(json.dumps(select(scores, 25)))
    same = main([str(a), str(positions), "--quota", "25", "--json"])
    assert same["overlap"] == 1.0 and "spearman" not in same
    # The store at another quota against the q=25 file.
    fewer = main([str(a), str(positions), "--quota", "10"])
    by_hand = sum(len(set(x) & set(y)) for x, y in zip(select(scores, 10), select(scores, 25)))
    assert (fewer["rows_a"], fewer["shared"]) == (12, by_hand)
    assert fewer["overlap"] == pytest.approx(by_hand / 30)


def test_bad_inputs_fail_with_one_line(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not json")
    two = tmp_path / "two.json"
    two.write_text(json.dumps([[0], [1]]))
    three = tmp_path / "three.json"
    three.write_text(json.dumps([[0], [1], [2]]))
    for args, match in (([str(tmp_path / "nope.h5"), str(two)], "does not exist"),
                        ([str(text), str(two)], "neither a KVA store"),
                        ([str(two), str(three)], "has 2 layers")):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0]


@needs_shared_data
def test_published_llama_files(capsys):
    root = SHARED_DATA / "original_pos_json" / "Llama-3.1-8B-Instruct"
    result = main([str(root / "10.json"), str(root / "20.json")])
    assert result["rows_a"] == 32 * 409 and result["rows_b"] == 32 * 819
    assert len(result["layers"]) == 32
    assert result["shared"] <= result["rows_a"]
