"""Atomic writes: a crash leaves the old file or the new one, never half of one."""

import json

import pytest


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    from loki_exp import atomic

    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic.writing(target) as tmp:
        tmp.write_text('{"a": 2')  # a crash mid-write
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]
    folder = tmp_path / "model"
    with atomic.writing_dir(folder) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic.writing_dir(folder) as tmp:
        (tmp / "w").write_text("half")
        raise RuntimeError("killed")
    assert (folder / "w").read_text() == "old"
    with atomic.writing_dir(folder) as tmp:
        (tmp / "w").write_text("new")
    assert (folder / "w").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model"]
