import json

import h5py
import numpy as np
import pytest

from loki_exp.errors import LokiError
from loki_exp.report import kva_extremes_per_layer, make_report


def _fake_run(root, name, method, quota, task_after, forgetting, store=None):
    run = root / name
    run.mkdir(parents=True)
    metrics = {"task/bfcl/accuracy/before": 0.0, "task/bfcl/accuracy/after": task_after,
               "task/bfcl/accuracy/delta": task_after,
               "bench/arc_easy/acc_norm/before": 0.5, "bench/arc_easy/acc_norm/after": 0.45,
               "forgetting/avg": forgetting}
    record = {"config": {"method": {"name": method}, "strategy": {"name": "layer_balanced"},
                         "quota": quota},
              "implant": {"trainable_parameters": 1000 * quota}, "metrics": metrics,
              "kva_store": str(store) if store else None}
    (run / "run.json").write_text(json.dumps(record))


def test_report_writes_table_and_both_plots(tmp_path):
    store = tmp_path / "kva.h5"
    scores = np.random.default_rng(0).normal(size=(6, 4, 10)).astype(np.float32)
    scores[:, 3] += 5.0  # the last layer holds the highest attributions
    with h5py.File(store, "w") as f:
        f.create_dataset("attributions", data=scores)
    root = tmp_path / "multirun"
    for i, (method, q, task, forget) in enumerate([("loki", 5, 0.2, 0.5), ("loki", 10, 0.3, 1.0),
                                                   ("lora", 10, 0.4, 4.0), ("full", 10, 0.5, 9.0)]):
        _fake_run(root, str(i), method, q, task, forget, store)
    out = make_report(root)
    assert len(out["rows"]) == 4
    csv_text = (root / "report.csv").read_text().splitlines()
    assert csv_text[0].startswith("run,label,method,strategy,quota,strategy_seed,seed,lr,"
                                  "trainable_parameters")
    assert len(csv_text) == 5 and csv_text[0].endswith("forgetting/avg")
    # Quota and strategy only for the methods that select rows: full fine-tuning has neither.
    assert csv_text[4].startswith("3,full,full,,,,,,")
    md = (root / "report.md").read_text()
    assert "| arm | lr | seed | task gain | Avg forgetting % |" in md
    assert "| loki q=10 layer_balanced |  |  | 0.3 | 1 |" in md and "| full |  |  | 0.5 | 9 |" in md
    assert (root / "forgetting_vs_task.png").stat().st_size > 10_000
    assert (root / "kva_heatmap.png").stat().st_size > 5_000
    high, low = kva_extremes_per_layer(str(store), 10)
    assert high.tolist() == [0, 0, 0, 4] and low.sum() == 4 and low[3] == 0


def test_report_cli_logs_to_wandb_offline(tmp_path, monkeypatch, capsys):
    from loki_exp.report.command import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = tmp_path / "multirun"
    _fake_run(root, "0", "loki", 10, 0.3, 1.0)
    _fake_run(root, "1", "lora", 10, 0.4, 4.0)
    main([str(root), "--wandb-project", "loki_exp_test"])
    printed = capsys.readouterr().out
    assert "| lora |  |  | 0.4 | 4 |" in printed and "forgetting_vs_task.png" in printed


def test_report_on_a_dir_without_runs(tmp_path):
    with pytest.raises(LokiError, match="holds no readable run.json"):
        make_report(tmp_path)
    with pytest.raises(LokiError, match="is not a directory"):
        make_report(tmp_path / "nope")


def _item_run(root, name, method, lr, task_after_items, arc_after_items):
    """A run with per-item scores (items.json) and the metrics the evaluate stage writes."""
    before = {"bench": {"arc": {"acc": 0.5}}, "bpb": {}, "task": {"accuracy": 0.0},
              "items": {"bench/arc/acc": [1.0, 0.0] * 50, "task/bfcl/accuracy": [0.0] * 100}}
    after = {"bench": {"arc": {"acc": float(np.mean(arc_after_items))}}, "bpb": {},
             "task": {"accuracy": float(np.mean(task_after_items))},
             "items": {"bench/arc/acc": arc_after_items, "task/bfcl/accuracy": task_after_items}}
    _write_run(root / name, method, lr, before, after)


def _write_run(run, method, lr, before, after):
    """run.json (config, the evaluate stage's metrics) and items.json, as a job writes them."""
    from loki_exp.evaluation.evaluate import flat_metrics

    run.mkdir(parents=True)
    record = {"config": {"method": {"name": method, "lr": lr}, "strategy": {"name": "layer_balanced"},
                         "quota": 10, "eval": {"forgetting_metric": "acc_norm"}},
              "metrics": flat_metrics("bfcl", before, after, "acc_norm")}
    (run / "run.json").write_text(json.dumps(record))
    items = {k: {"before": before["items"][k], "after": v} for k, v in after["items"].items()}
    (run / "items.json").write_text(json.dumps(items))


def test_report_intervals_significance_and_pareto_fronts(tmp_path):
    root = tmp_path / "multirun"
    keep = [1.0, 0.0] * 50
    forget = [1.0, 0.0] * 25 + [0.0] * 50  # half the right answers lost
    _item_run(root, "0", "loki", 1e-4, [1.0] * 30 + [0.0] * 70, keep)
    _item_run(root, "1", "loki", 1e-3, [1.0] * 50 + [0.0] * 50, keep)
    _item_run(root, "2", "full", 1e-5, [1.0] * 50 + [0.0] * 50, forget)
    out = make_report(root)
    md = (root / "report.md").read_text()
    # The task gain with its interval, marked: excludes 0.
    assert "| loki q=10 layer_balanced | 0.0001 |  | 0.3* [0.21, 0.39] |" in md
    # full forgets 50% (relative), significantly more than either LoKI run; its task score
    # equals loki lr=1e-3's, so that pair differs only in forgetting.
    assert "Significant differences between arms" in md
    rows = [line for line in md.splitlines()
            if line.startswith("| loki q=10 layer_balanced lr=0.001 | full")]
    assert len(rows) == 1 and "Avg forgetting" in rows[0]
    assert any(line.startswith("| loki q=10 layer_balanced lr=0.0001 | full") and "task score" in line
               for line in md.splitlines())
    assert out["pareto"].stat().st_size > 10_000


def _category_run(root, name, method, simple_after, irrelevance_after):
    """A run scored by BFCL category: the overall is the categories' mean, with no item list."""
    from tests.support.scores import bfcl_category_scores

    before = bfcl_category_scores([0.0] * 40, [1.0] * 40)
    after = bfcl_category_scores(simple_after, irrelevance_after)
    _write_run(root / name, method, 1e-3, before, after)


def test_report_gives_the_bfcl_overall_an_interval_and_tests_it_between_methods(tmp_path):
    root = tmp_path / "multirun"
    _category_run(root, "0", "loki", [1.0] * 30 + [0.0] * 10, [1.0] * 40)  # +0.375 overall
    _category_run(root, "1", "lora", [0.0] * 40, [1.0] * 40)               # nothing learned
    out = make_report(root)
    md = (root / "report.md").read_text()
    assert "| loki q=10 layer_balanced | 0.001 |  | 0.375* [" in md
    assert "| lora | 0.001 |  | 0 [0, 0] |" in md
    assert any(line.startswith("| loki q=10 layer_balanced lr=0.001 | lora lr=0.001 | task score")
               for line in md.splitlines())
    assert out["rows"][0]["task/bfcl/leaderboard_accuracy/delta/ci_low"] > 0.2


def test_report_skips_a_run_with_a_truncated_metrics_file_and_names_it(tmp_path, caplog):
    root = tmp_path / "multirun"
    _fake_run(root, "0", "loki", 10, 0.3, 1.0)
    _fake_run(root, "1", "lora", 10, 0.4, 4.0)
    (root / "1" / "metrics.json").write_text('{"task/bfcl/accuracy/after": 0.')  # cut short
    with caplog.at_level("WARNING"):
        out = make_report(root)
    assert [r["method"] for r in out["rows"]] == ["loki"]
    assert str(root / "1" / "metrics.json") in caplog.text
    assert not list(root.glob(".*.tmp"))  # the report's own files went through temp + rename


def test_html_report_is_one_page_that_renders_with_its_table_and_plots(tmp_path):
    """Rendered in headless Chromium where it is installed (Debian: apt-get install chromium)."""
    import shutil
    import subprocess

    from loki_exp.report.command import main

    root = tmp_path / "multirun"
    _fake_run(root, "0", "loki", 10, 0.3, 1.0)
    _fake_run(root, "1", "lora", 10, 0.4, 4.0)
    main([str(root), "--html"])
    page = (root / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<td>lora</td>" in page
    assert "src=\"file:" not in page and "report.md" not in page  # nothing outside the page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium to render the page (Debian: apt-get install chromium)")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=5000", "--dump-dom",
                          (root / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-loaded="2"' in dom
    assert dom.count("<tr>") >= 3 and "<td>loki q=10 layer_balanced</td>" in dom


def test_report_task_axis_is_the_gold_bpb_reduction_with_trained_accuracy_and_false_calls(tmp_path):
    """A run as the evaluate stage now scores BFCL: the task gain is how far the gold answers'
    bits per byte fell (% of the base), beside the trained accuracy's change and the
    false-call rate, each with its interval."""
    def scores(gold, trained, false_calls):
        return {"bench": {}, "bpb": {}, "task": {"gold_bpb": float(np.mean(gold)),
                                                 "trained_accuracy/simple_python": float(np.mean(trained)),
                                                 "trained_accuracy": float(np.mean(trained)),
                                                 "false_call_rate/irrelevance": float(np.mean(false_calls)),
                                                 "false_call_rate": float(np.mean(false_calls))},
                "items": {"task/bfcl/gold_bpb": gold,
                          "task/bfcl/trained_accuracy/simple_python": trained,
                          "task/bfcl/false_call_rate/irrelevance": false_calls}}

    base = scores([1.0] * 50, [0.0] * 30, [0.0] * 30)
    root = tmp_path / "multirun"
    _write_run(root / "0", "loki", 1e-3, base, scores([0.5] * 50, [1.0] * 15 + [0.0] * 15, [0.0] * 30))
    _write_run(root / "1", "lora", 1e-3, base, scores([0.8] * 50, [1.0] * 3 + [0.0] * 27, [1.0] * 30))
    make_report(root)
    md = (root / "report.md").read_text()
    assert ("| arm | lr | seed | task gain % | trained accuracy change | false-call rate |"
            in md)
    assert "| loki q=10 layer_balanced | 0.001 |  | 50* [50, 50] | 0.5* [0.333, 0.668] | 0 [0, 0] |" in md
    assert "| lora | 0.001 |  | 20* [20, 20] | 0.1 [0, 0.2] | 1* [1, 1] |" in md
    assert "Base model: task/bfcl/gold_bpb = 1" in md
    # Gold bpb differs between the arms on the same items: lower for loki (b - a > 0).
    assert any(line.startswith("| loki q=10 layer_balanced lr=0.001 | lora lr=0.001 | task score")
               and "[0.3, 0.3]" in line for line in md.splitlines())


def test_markdown_and_html_tables_are_rendered_from_the_same_blocks(tmp_path):
    """report.md and report.html show the same tables, cell for cell; report.csv the same runs."""
    import csv
    import re

    from loki_exp.report.render import Table, html_body

    root = tmp_path / "multirun"
    _fake_run(root, "0", "loki", 10, 0.3, 1.0)
    _fake_run(root, "1", "lora", 10, 0.4, 4.0)
    out = make_report(root)
    tables = [b for b in out["blocks"] if isinstance(b, Table)]
    assert tables and (root / "report.md").read_text() == "\n".join(out["table"]) + "\n"
    md_rows = [[c.strip() for c in line.strip("|").split("|")]
               for line in out["table"] if line.startswith("|") and "---" not in line]
    page = html_body(out["blocks"])
    html_rows = [re.findall(r"<t[hd]>(.*?)</t[hd]>", row) for row in re.findall(
        r"<tr>(.*?)</tr>", page)]
    assert html_rows == md_rows and len(md_rows) == sum(1 + len(t.rows) for t in tables)
    with open(root / "report.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["0", "1"]


def test_the_report_imports_neither_torch_nor_lightning():
    """`python -m loki_exp.report` reads records: it starts in a fraction of a second (it
    imported both, 4 s, through the curve writer for the name of its file)."""
    import subprocess
    import sys

    code = ("import sys, loki_exp.report, loki_exp.report.command; "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
