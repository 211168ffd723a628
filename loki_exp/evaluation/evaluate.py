"""The evaluate stage: general benchmarks and the task metric, base vs tuned, and forgetting.

Base-model scores are cached by content key (weights fingerprint, eval settings, test
items) under ``<cache>/eval``, so a sweep scores the base model once. Metric names are flat
and self-explaining: ``task/bfcl/accuracy/before``, ``bench/arc_easy/acc_norm/after``,
``bench/arc_easy/acc_norm/delta``, ``forgetting/avg``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from loki_exp.data import assets
from loki_exp.data.sft import PadCollator, encode_all
from loki_exp.data.tasks import TaskData
from loki_exp.evaluation.benchmarks import run_suite
from loki_exp.evaluation.scores import forgetting_avg
from loki_exp.evaluation.task_metric import bfcl_accuracy
from loki_exp.models import LoadedModel, load_model

log = logging.getLogger(__name__)


def _test_items(cfg: DictConfig, task: TaskData) -> list:
    limit = cfg.eval.get("task_limit")
    return task.test if limit is None else task.test[: int(limit)]


@torch.no_grad()
def _heldout_loss(model, tokenizer, examples, max_length: int, overflow: str) -> float:
    from loki_exp.implant.module import CausalLMTuner

    encoded, _ = encode_all(tokenizer, examples, max_length, overflow)
    if not encoded:
        return float("nan")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = DataLoader(encoded, batch_size=4, collate_fn=PadCollator(pad))
    tuner = CausalLMTuner(model, lr=0.0, max_steps=1)
    losses = [float(tuner.response_loss(b)) for b in loader]
    return sum(losses) / len(losses)


def score_model(cfg: DictConfig, model, tokenizer, task: TaskData) -> dict[str, Any]:
    """{"bench": {name: {metric: value}}, "task": {metric: value}} for one model."""
    ev = cfg.eval
    model.eval()
    bench = run_suite(model, tokenizer, list(ev.benchmarks), ev.limit, int(ev.batch_size),
                      ev.source, cfg.paths.cache_dir) if ev.benchmarks else {}
    items = _test_items(cfg, task)
    if task.name == "bfcl":
        acc, rows = bfcl_accuracy(model, tokenizer, items, int(ev.max_new_tokens),
                                  int(ev.batch_size))
        task_scores = {"accuracy": acc, "n": len(rows)}
    else:
        task_scores = {"loss": _heldout_loss(model, tokenizer, items, int(cfg.dataset.max_length),
                                             cfg.dataset.get("overflow", "drop")),
                       "n": len(items)}
    return {"bench": bench, "task": task_scores}


def _base_key(cfg: DictConfig, loaded: LoadedModel, task: TaskData) -> str:
    spec = {"weights": loaded.fingerprint,
            "eval": OmegaConf.to_container(cfg.eval, resolve=True),
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
            "test_ids": [getattr(i, "id", None) for i in _test_items(cfg, task)]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def base_scores(cfg: DictConfig, loaded: LoadedModel, task: TaskData) -> dict[str, Any]:
    path = (assets.cache_dir(cfg.paths.cache_dir) / "eval" / loaded.name /
            f"{_base_key(cfg, loaded, task)}.json")
    if path.exists():
        log.info("evaluate: base scores from cache %s", path)
        return json.loads(path.read_text())
    base = load_model(cfg.model, cfg.paths.cache_dir)
    scores = score_model(cfg, base.model, base.tokenizer, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(scores))
    tmp.replace(path)
    return scores


def flat_metrics(task_name: str, before: dict, after: dict, primary: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric, value in after["task"].items():
        if metric == "n":
            continue
        out[f"task/{task_name}/{metric}/before"] = before["task"][metric]
        out[f"task/{task_name}/{metric}/after"] = value
        out[f"task/{task_name}/{metric}/delta"] = value - before["task"][metric]
    primary_before, primary_after = {}, {}
    for bench, metrics in after["bench"].items():
        for metric, value in metrics.items():
            b = before["bench"][bench][metric]
            out[f"bench/{bench}/{metric}/before"] = b
            out[f"bench/{bench}/{metric}/after"] = value
            out[f"bench/{bench}/{metric}/delta"] = value - b
        key = primary if primary in metrics else "acc"
        primary_before[bench], primary_after[bench] = before["bench"][bench][key], metrics[key]
    if primary_before:
        # Relative forgetting is undefined where the base scores 0: leave those out, say so.
        zero = sorted(b for b, v in primary_before.items() if v == 0)
        if zero:
            log.warning("forgetting/avg leaves out %s: the base model scores 0 there", zero)
        kept = [b for b in primary_before if b not in zero]
        out["forgetting/avg"] = (forgetting_avg({b: primary_before[b] for b in kept},
                                                {b: primary_after[b] for b in kept})
                                 if kept else float("nan"))
    return out


def run_evaluate(cfg: DictConfig, loaded: LoadedModel, task: TaskData,
                 output_dir: Path) -> dict[str, float]:
    before = base_scores(cfg, loaded, task)
    after = score_model(cfg, loaded.model, loaded.tokenizer, task)
    metrics = flat_metrics(task.name, before, after, str(cfg.eval.forgetting_metric))
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("evaluate: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                                       if k.endswith(("/after", "avg"))))
    return metrics
