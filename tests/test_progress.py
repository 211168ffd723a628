"""The progress lines a long stage prints to its log."""

def test_progress_prints_every_five_percent_or_minute(monkeypatch):
    import io

    from loki_exp import progress

    clock = iter([0.0] + [1.0 * i for i in range(1, 201)])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = progress.Progress("x", 200, stream)
    for done in range(1, 201):
        bar.update(done)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20 and lines[0] == "x: 10/200 (5%), 0m10s elapsed, ETA 3m10s"
    assert lines[-1].startswith("x: 200/200 (100%)")
