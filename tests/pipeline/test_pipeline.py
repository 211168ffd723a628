"""The whole run: analyse -> select -> implant -> export, as python -m loki_exp.train runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from loki_exp.errors import LokiError
from loki_exp.model_access import down_projs
from loki_exp.models import load_model
from loki_exp.pipeline import run
from loki_exp.selection import load_positions
from tests.support.paths import SHARED_DATA, needs_shared_data

NO_EVAL = "stages=[analyse,select,implant,export]"


def _run(compose_cfg, tmp_path, *overrides):
    cfg = compose_cfg("model=tiny_llama", "kva.limit=4", "trainer.max_steps=3",
                      "trainer.batch_size=2", "trainer.precision=32-true",
                      "eval.benchmarks=[arc_easy]", "eval.limit=4", "eval.task_bpb_items=2",
                      "eval.max_new_tokens=8", "eval.bpb_limit=3", "eval.drift_prompts=3",
                      "eval.drift_max_new_tokens=8", "eval.bfcl_trained_items=2",
                      "eval.bfcl_irrelevance_items=2", "eval.bfcl_transfer_items=1",
                      "trainer.log_every_n_steps=1",
                      f"paths.cache_dir={tmp_path / 'cache'}",
                      f"paths.output_dir={tmp_path / 'run'}", *overrides)
    return cfg, run(cfg, tmp_path / "run")


def test_loki_run_writes_positions_model_and_record(compose_cfg, tmp_path, isolated_cache):
    cfg, state = _run(compose_cfg, tmp_path, "quota=30")
    out = tmp_path / "run"
    positions = load_positions(out / "positions.json", 3, 64)
    assert [len(p) for p in positions] == [19, 19, 19]  # floor(0.3 * 192) // 3
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["quota"] == 30
    assert record["implant"]["trainable_parameters"] == 3 * 19 * 96
    assert record["kva_store"].endswith(".h5") and record["positions"].endswith("positions.json")
    assert set(record["timings_s"]) >= {"load_model", "analyse", "select", "implant", "export",
                                        "evaluate"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert record["metrics"] == metrics
    # BFCL: a random model writes no valid call, which is right only where no function fits
    # (irrelevance): 0 on the trained and transfer categories, no false call; the
    # leaderboard's mean over its 10 categories is then 2/10.
    for category in ("simple_python", "multiple", "live_simple"):
        assert metrics[f"task/bfcl/trained_accuracy/{category}/before"] == 0.0
    assert metrics["task/bfcl/trained_accuracy/before"] == 0.0
    assert metrics["task/bfcl/false_call_rate/before"] == 0.0
    assert metrics["task/bfcl/false_call_rate/live_irrelevance/before"] == 0.0
    assert metrics["task/bfcl/transfer_accuracy/live_parallel/before"] == 0.0
    assert metrics["task/bfcl/leaderboard_accuracy/before"] == pytest.approx(0.2)
    # Gold bits per byte on 2 held-out items of each trained category, and how far it fell.
    items = json.loads((out / "items.json").read_text())
    assert len(items["task/bfcl/gold_bpb"]["after"]) == 6
    assert metrics["task/bfcl/gold_bpb/before"] > 1.0  # a random model: several bits per byte
    assert metrics["task/bfcl/gold_bpb/reduction_pct"] == pytest.approx(
        100 * (1 - metrics["task/bfcl/gold_bpb/after"] / metrics["task/bfcl/gold_bpb/before"]))
    assert (metrics["task/bfcl/gold_bpb/reduction_pct/ci_low"]
            <= metrics["task/bfcl/gold_bpb/reduction_pct"]
            <= metrics["task/bfcl/gold_bpb/reduction_pct/ci_high"])
    # Every training example fit max_length, counted by category (irrelevance ones too).
    data = record["implant"]["data_by_category"]
    assert set(data) == {"simple_python", "multiple", "live_simple", "irrelevance",
                         "live_irrelevance"}
    assert all(d["dropped"] == 0 and d["kept"] == d["examples"] for d in data.values())
    # Each stage's precision as it ran: KVA in the published preset's bf16, training as
    # configured, the evaluation in the model's fp32.
    assert record["precision"]["analyse"].startswith("bfloat16")
    assert record["precision"]["implant"] == "32-true (as configured)"
    assert record["precision"]["evaluate"].startswith("float32")
    # The continuous measures: bits per byte as shipped and chat-rendered, KL drift and
    # format damage, each with its interval; per-item scores for the report.
    for name in ("gsm8k", "gsm8k_chat", "humaneval", "naturalqs_chat", "jeopardy"):
        assert metrics[f"bpb/{name}/before"] > 0 and f"bpb/{name}/delta/ci_low" in metrics
    assert metrics["drift/kl/after"] > 0 and metrics["drift/kl/ci_low"] <= metrics["drift/kl/after"]
    assert 0.0 <= metrics["drift/format_damage/after"] <= 1.0
    assert len(items["bpb/gsm8k"]["before"]) == len(items["bpb/gsm8k"]["after"]) == 3
    for when in ("before", "after"):
        assert 0.0 <= metrics[f"bench/arc_easy/acc_norm/{when}"] <= 1.0
    assert metrics["bench/arc_easy/acc/delta"] == pytest.approx(
        metrics["bench/arc_easy/acc/after"] - metrics["bench/arc_easy/acc/before"])
    assert "forgetting/avg" in metrics
    # The CSV logger got the training loss and the final metrics.
    csv_text = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss" in csv_text and "forgetting/avg" in csv_text
    # The exported model differs from the base only in the selected rows.
    base = load_model(cfg.model).model
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    for rows, w0, w1 in zip(positions, down_projs(base), down_projs(tuned)):
        frozen = np.setdiff1d(np.arange(64), rows)
        assert torch.equal(w0.weight[frozen], w1.weight[frozen])
        assert not torch.equal(w0.weight[rows], w1.weight[rows])
    for (name, p0), (_, p1) in zip(base.named_parameters(), tuned.named_parameters()):
        if "down_proj" not in name:
            assert torch.equal(p0, p1), name
    # The export's Hugging Face model card holds what was trained and the run's numbers.
    card = (out / "model" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "quota:30" in front["tags"]
    assert "strategy `layer_balanced`" in card and "KVA preset `published`" in card
    assert f"Trainable parameters: {3 * 19 * 96:,}" in card
    key = "bench/arc_easy/acc_norm"
    row = (f"| {key} | {metrics[key + '/before']:.4g} | {metrics[key + '/after']:.4g} | "
           f"{metrics[key + '/delta']:.4g} | [{metrics[key + '/delta/ci_low']:.4g}, "
           f"{metrics[key + '/delta/ci_high']:.4g}] |")
    assert row in card
    assert f"`forgetting/avg` (percent, positive = forgot): {metrics['forgetting/avg']:.4g}" in card


def test_baseline_run_skips_kva(compose_cfg, tmp_path, isolated_cache):
    _, state = _run(compose_cfg, tmp_path, "method=lora", NO_EVAL)
    assert state.kva_store is None and not (tmp_path / "run" / "positions.json").exists()
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_positions_file_replaces_kva(compose_cfg, tmp_path, isolated_cache):
    path = tmp_path / "pos.json"
    path.write_text(json.dumps([[1, 2], [3], [4, 5, 6]]))
    _, state = _run(compose_cfg, tmp_path, f"positions_file={path}", NO_EVAL)
    assert state.kva_store is None
    assert state.implant["trainable_parameters"] == 6 * 96


@needs_shared_data
def test_bad_positions_file_leaves_nothing_half_written(compose_cfg, tmp_path, isolated_cache):
    wrong = SHARED_DATA / "original_pos_json" / "Qwen2.5-0.5B-Instruct" / "10.json"
    with pytest.raises(LokiError, match="has 24 layer lists, the model has 3 layers"):
        _run(compose_cfg, tmp_path, f"positions_file={wrong}", NO_EVAL)
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_smoke_experiment_on_smollm2(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=smoke", f"paths.output_dir={tmp_path}")
    assert set(cfg.stages) >= {"analyse", "select", "implant", "export"}
    state = run(cfg, tmp_path)
    assert state.implant["trainable_parameters"] == 30 * 57 * 1536
    assert np.isfinite(state.implant["final_train_loss"])
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert tuned.config.num_hidden_layers == 30
    metrics = state.metrics
    assert 0.25 <= metrics["bench/arc_easy/acc/before"] <= 0.8  # SmolLM2 is far above chance
    assert metrics["task/bfcl/trained_accuracy/simple_python/before"] <= 0.5  # mostly prose
    assert 0.0 <= metrics["task/bfcl/false_call_rate/before"] <= 1.0
    # The gold calls cost the base model around a bit per byte (a random model: ~5-20).
    assert 0.1 < metrics["task/bfcl/gold_bpb/before"] < 3.0
    # Gold answers cost a real model around a bit per byte (a random one: ~15-20).
    assert 0.2 < metrics["bpb/naturalqs/before"] < 3.0
    assert metrics["bpb/humaneval_chat/before"] < 3.0
    assert np.isfinite(metrics["forgetting/avg"])


def test_task_scored_on_another_dataset(compose_cfg, tmp_path, isolated_cache):
    """eval.task_dataset (paper_toolace: BFCL): a model trained on a JSONL task is scored on
    BFCL's held-out items, not on the training data's own split."""
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"})
                              for i in range(12)) + "\n")
    cfg, state = _run(compose_cfg, tmp_path, "method=lora", "dataset=jsonl",
                      f"dataset.path={data}", "dataset.test_fraction=0", "eval.benchmarks=[]",
                      "stages=[implant,evaluate]", "eval.task_dataset={name: bfcl, source: offline, "
                      "categories: [simple_python], test_fraction: 0.2, max_length: 768}")
    metrics = state.metrics
    assert {"task/bfcl/trained_accuracy/before", "task/bfcl/gold_bpb/after"} <= set(metrics)
    assert not any(k.startswith("task/jsonl") for k in metrics)


def test_random_rows_with_curves_along_training(compose_cfg, tmp_path, isolated_cache, capsys,
                                                monkeypatch):
    """strategy=random needs no KVA and trains layer_balanced's count of rows per layer;
    eval.every_n_steps=2 with eval.curve_steps=[1] evaluates at steps 0, 1, 2 and 4 on the final
    evaluation's items: the
    step-0 point is the base model's scores, read not measured (LoKI starts at the base's
    function), the last one is the evaluate stage's numbers (not computed again), and the
    loggers get every point."""
    from loki_exp.evaluation import evaluate
    from loki_exp.evaluation.gold_bpb import gold_bpb

    scored = []
    monkeypatch.setattr(evaluate, "gold_bpb", lambda *a: scored.append(1) or gold_bpb(*a))
    cfg, state = _run(compose_cfg, tmp_path, "strategy=random", "strategy.seed=3", "quota=30",
                      "trainer.max_steps=4", "eval.every_n_steps=2", "eval.curve_steps=[1]",
                      "eval.bfcl_transfer_items=0")
    assert len(scored) == 4  # the base, then the points at steps 1, 2 and 4
    out = tmp_path / "run"
    assert state.kva_store is None
    positions = load_positions(out / "positions.json", 3, 64)
    assert [len(p) for p in positions] == [19, 19, 19]  # as layer_balanced at q=30
    records = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert records[0]["model"] == "base" and [r["step"] for r in records[1:]] == [0, 1, 2, 4]
    assert records[1]["from"] == "base" and "from" not in records[2]
    first, last = records[1]["metrics"], records[-1]["metrics"]
    assert first["drift/kl/after"] == 0.0
    assert first["task/bfcl/gold_bpb/after"] == first["task/bfcl/gold_bpb/before"]
    assert first["forgetting/avg_bpb"] == 0.0
    final = state.metrics
    for key in ("task/bfcl/gold_bpb/after", "task/bfcl/gold_bpb/reduction_pct", "drift/kl/after",
                "forgetting/avg_bpb", "bpb/gsm8k/after"):
        assert last[key] == pytest.approx(final[key], rel=1e-9, abs=1e-12), key
    assert records[-1]["items"]["task/bfcl/gold_bpb"] == json.loads(
        (out / "items.json").read_text())["task/bfcl/gold_bpb"]["after"]
    csv_text = (out / "csv" / "metrics.csv").read_text()
    assert "curve/task/bfcl/gold_bpb/reduction_pct" in csv_text
    # The run ends with its summary: headline measures with intervals, stage times, paths.
    printed = capsys.readouterr().out
    assert "| task: gold-answer bits per byte |" in printed
    assert "| damage: false-call rate |" in printed and "Stage times: load_model" in printed
    assert f"- model: {out / 'model'}" in printed
    assert ("Training examples kept (of those given), by category: irrelevance 90/90, "
            "live_irrelevance 206/206, live_simple 199/199, multiple 166/166, "
            "simple_python 326/326") in printed
    summary = (out / "summary.md").read_text()
    assert summary.startswith("## Run summary") and summary.strip() in printed
    card = (out / "model" / "README.md").read_text()
    assert card.index("## Results") < card.index("| task: gold-answer bits per byte |") \
        < card.index("## Training") < card.index("Every measure")
    assert "drawn at random per layer (strategy `random`, seed 3; no KVA)" in card
