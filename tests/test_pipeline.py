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
from tests.conftest import SHARED_DATA, needs_shared_data

NO_EVAL = "stages=[analyse,select,implant,export]"


def _run(compose_cfg, tmp_path, *overrides):
    cfg = compose_cfg("model=tiny_llama", "kva.limit=4", "trainer.max_steps=3",
                      "trainer.batch_size=2", "trainer.precision=32-true",
                      "eval.benchmarks=[arc_easy]", "eval.limit=4", "eval.task_limit=3",
                      "eval.max_new_tokens=8", "eval.bpb_limit=3", "eval.drift_prompts=3",
                      "eval.drift_max_new_tokens=8", "eval.bfcl_per_category=2",
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
    # BFCL per leaderboard category: a random model writes no valid call, which is right
    # only where no function fits (irrelevance); the overall is the categories' mean.
    categories = list(cfg.eval.bfcl_categories)
    per = {c: metrics[f"task/bfcl/{c}/accuracy/before"] for c in categories}
    assert per == {c: 1.0 if "irrelevance" in c else 0.0 for c in categories}
    assert metrics["task/bfcl/accuracy/before"] == pytest.approx(sum(per.values()) / len(per))
    assert metrics["task/bfcl/irrelevance/accuracy/delta/ci_low"] <= 0.0
    # The continuous measures: bits per byte as shipped and chat-rendered, KL drift and
    # format damage, each with its interval; per-item scores for the report.
    for name in ("gsm8k", "gsm8k_chat", "humaneval", "naturalqs_chat", "jeopardy"):
        assert metrics[f"bpb/{name}/before"] > 0 and f"bpb/{name}/delta/ci_low" in metrics
    assert metrics["drift/kl/after"] > 0 and metrics["drift/kl/ci_low"] <= metrics["drift/kl/after"]
    assert 0.0 <= metrics["drift/format_damage/after"] <= 1.0
    items = json.loads((out / "items.json").read_text())
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
    assert "kva_store" not in state.artifacts and not (tmp_path / "run" / "positions.json").exists()
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_positions_file_replaces_kva(compose_cfg, tmp_path, isolated_cache):
    path = tmp_path / "pos.json"
    path.write_text(json.dumps([[1, 2], [3], [4, 5, 6]]))
    _, state = _run(compose_cfg, tmp_path, f"positions_file={path}", NO_EVAL)
    assert "kva_store" not in state.artifacts
    assert state.artifacts["implant"]["trainable_parameters"] == 6 * 96


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
    assert state.artifacts["implant"]["trainable_parameters"] == 30 * 57 * 1536
    assert np.isfinite(state.artifacts["implant"]["final_train_loss"])
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert tuned.config.num_hidden_layers == 30
    metrics = state.artifacts["metrics"]
    assert 0.25 <= metrics["bench/arc_easy/acc/before"] <= 0.8  # SmolLM2 is far above chance
    assert metrics["task/bfcl/simple_python/accuracy/before"] <= 0.5  # mostly prose
    assert 0.0 <= metrics["task/bfcl/accuracy/before"] <= 1.0
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
    metrics = state.artifacts["metrics"]
    assert {"task/bfcl/accuracy/before", "task/bfcl/accuracy/after"} <= set(metrics)
    assert not any(k.startswith("task/jsonl") for k in metrics)
