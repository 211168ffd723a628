"""The evaluate stage: general benchmarks, continuous measures and the task measures, base vs
tuned, with paired bootstrap intervals, and forgetting.

Base-model scores (per item) are cached by content key (weights fingerprint, eval settings,
test items) under ``<cache>/eval``, so a sweep scores the base model once; the part that
needs no generation is cached on its own (a curve along training needs only that). Metric
names are flat and self-explaining: ``task/bfcl/gold_bpb/before``, ``bench/arc_easy/acc_norm/after``,
``bench/arc_easy/acc_norm/delta`` with ``/ci_low`` and ``/ci_high`` (95% paired bootstrap
over the same items), ``bpb/gsm8k_chat/after``, ``drift/kl/after``,
``drift/format_damage/after``, ``forgetting/avg``. Per-item scores go to ``items.json`` so
the report can test differences between runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loki_exp import atomic
from loki_exp.data import assets, bfcl
from loki_exp.data.tasks import TaskData
from loki_exp.evaluation.bootstrap import forgetting_avg_ci, paired_delta_ci, stratified_delta_ci
from loki_exp.evaluation.bpb import score_bpb
from loki_exp.evaluation.drift import (
    answer_logprobs,
    chat_prompts,
    drift_questions,
    kl_per_item,
    looks_like_call,
)
from loki_exp.evaluation.gold_bpb import encode_gold, gold_bpb
from loki_exp.evaluation.scores import category_keys, forgetting_avg
from loki_exp.evaluation.suite import (
    make_lm,
    primary_metric,
    run_suite,
)
from loki_exp.evaluation.task_metric import bfcl_measures, generate
from loki_exp.models import LoadedModel, load_model
from loki_exp.progress import track

if TYPE_CHECKING:
    from loki_exp.config_schema import Eval, RunConfig

# Base-score cache layout; bump when what a cached entry holds changes.
CACHE_FORMAT = 5  # 5: shared-context log-likelihoods; 4: gold bpb and the four BFCL measures

log = logging.getLogger(__name__)


def task_heldout(task: TaskData, per_category: int | None) -> list:
    """The task's held-out items that gold bits per byte scores: ``per_category`` of each
    category's (drawn in ``bfcl.sample_order``; all when None), in split order."""
    if per_category is None:
        return list(task.test)
    by_cat: dict[str, list] = {}
    for item in task.test:
        by_cat.setdefault(getattr(item, "category", "all"), []).append(item)
    chosen = {i.id for items in by_cat.values() for i in bfcl.sample_order(items)[:per_category]}
    return [i for i in task.test if i.id in chosen]


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def score_cheap(cfg: RunConfig, model, tokenizer, task: TaskData, lm=None,
                answers: bool = False, gold_nll: dict[str, float] | None = None) -> dict[str, Any]:
    """The measures that need no generation, per item: the task's gold-answer bits per byte
    and the forgetting suite's bits-per-byte sets (what a training curve evaluates); with
    ``answers``, also the model's own greedy answers to the drift questions (the base's are
    what KL drift is measured on). ``gold_nll``: gold sums already taken, by item id."""
    ev = cfg.eval
    heldout = task_heldout(task, ev.task_bpb_items)
    reused = sum(i.id in (gold_nll or {}) for i in heldout)
    log.info("evaluate: gold-answer bits per byte of %d held-out %s items%s", len(heldout),
             task.name, f" ({reused} from the generation's prompt caches)" if reused else "")
    gold = gold_bpb(model, tokenizer, heldout, ev.batch_size, gold_nll)
    out: dict[str, Any] = {"task": {"gold_bpb": _mean(gold)}, "bpb": {},
                           "items": {f"task/{task.name}/gold_bpb": gold}}
    if ev.bpb:
        lm = lm or make_lm(model, tokenizer, ev.batch_size)
        for name, values in score_bpb(lm, tokenizer, ev.bpb, ev.bpb_limit,
                                      cfg.paths.cache_dir).items():
            out["bpb"][name] = _mean(values)
            out["items"][f"bpb/{name}"] = values
    out["drift"] = drift_answers(cfg, model, tokenizer) if answers else {}
    return out


def drift_answers(cfg: RunConfig, model, tokenizer) -> dict[str, Any]:
    """``{"answers": [...]}``: the model's own greedy answers to the drift questions (the
    base's are what KL drift is measured on; a tuned model's, for format damage)."""
    ev = cfg.eval
    if not ev.drift_prompts:  # 0 or null: off
        return {}
    questions = drift_questions(ev.drift_prompts, cfg.paths.cache_dir)
    return {"answers": generate(
        model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
        ev.drift_max_new_tokens, ev.generation_batch_tokens, "drift answers")}


def cheap_from_point(cfg: RunConfig, model, tokenizer, task: TaskData,
                     point: dict[str, Any]) -> dict[str, Any]:
    """``score_cheap(answers=True)`` of the trained model from the curve's point at its last
    step (``evaluation/curves.py``): the same model on the same items, so only the drift
    answers are generated; the point's KL stays in ``items``."""
    items = point["items"]
    gold = f"task/{task.name}/gold_bpb"
    return {"task": {"gold_bpb": _mean(items[gold])},
            "bpb": {k.removeprefix("bpb/"): _mean(v) for k, v in items.items()
                    if k.startswith("bpb/")},
            "items": dict(items), "drift": drift_answers(cfg, model, tokenizer)}


def _bfcl_counts(ev: Eval) -> dict[str, int]:
    return {"trained": ev.bfcl_trained_items, "irrelevance": ev.bfcl_irrelevance_items,
            "transfer": ev.bfcl_transfer_items}


def score_model(cfg: RunConfig, model, tokenizer, task: TaskData,
                cheap: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"bench": {name: {metric: value}}, "bpb": {set: value}, "task": {metric: value},
    "drift": {"answers": [...]}, "items": {metric key: per-item values}} for one model;
    ``cheap``: its ``score_cheap(answers=True)`` when already computed."""
    return score_model_and_cheap(cfg, model, tokenizer, task, cheap)[0]


def score_model_and_cheap(cfg: RunConfig, model, tokenizer, task: TaskData,
                          cheap: dict[str, Any] | None = None
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``score_model`` and its ``score_cheap(answers=True)`` part. BFCL's generation runs
    first: the gold answers of the held-out items it prompts are scored over its prompt
    caches (``task_metric.generate_scored``), so gold bits per byte runs only the others."""
    ev = cfg.eval
    model.eval()
    out: dict[str, Any] = {"bench": {}, "bpb": {}, "task": {}, "drift": {}, "items": {}}
    lm = make_lm(model, tokenizer, ev.batch_size)
    if ev.benchmarks:
        log.info("evaluate: %d benchmarks through lm-eval (%s items each): %s",
                 len(ev.benchmarks), ev.limit or "all", ", ".join(ev.benchmarks))
        # One benchmark at a time: a progress line (with ETA) per benchmark in a log.
        for bench in track(ev.benchmarks, "benchmarks", len(ev.benchmarks)):
            scores, per_item = run_suite(
                lm, [bench], ev.limit, ev.source, cfg.paths.cache_dir,
                paper_data=ev.paper_data, allow_code=ev.allow_code_execution,
                max_new_tokens=ev.paper_max_new_tokens)
            out["bench"].update(scores)
            for name, metrics in per_item.items():
                out["items"].update({f"bench/{name}/{m}": v for m, v in metrics.items()})
    gold_nll: dict[str, float] = {}
    if task.name == "bfcl":
        log.info("evaluate: BFCL calls generated on held-out items (%s per category: trained, "
                 "irrelevance, transfer)", "/".join(str(v) for v in _bfcl_counts(ev).values()))
        gold = None if cheap is not None else {
            i.id: encode_gold(tokenizer, i) for i in task_heldout(task, ev.task_bpb_items)}
        scores, items, gold_nll = bfcl_measures(
            model, tokenizer, list(task.categories), task.test_fraction, _bfcl_counts(ev),
            ev.max_new_tokens, ev.generation_batch_tokens, cfg.paths.cache_dir, gold)
        out["task"].update(scores)
        out["items"].update({f"task/bfcl/{k}": v for k, v in items.items()})
    if ev.bpb:
        log.info("evaluate: bits per byte of %s (%s items each, as shipped and chat-rendered)",
                 ", ".join(ev.bpb), ev.bpb_limit or "all")
    cheap = cheap or score_cheap(cfg, model, tokenizer, task, lm, answers=True, gold_nll=gold_nll)
    for part in ("task", "bpb", "items", "drift"):
        out[part].update(cheap[part])
    if out["drift"].get("answers"):
        out["items"]["drift/format_damage"] = [float(looks_like_call(a))
                                               for a in out["drift"]["answers"]]
    return out, cheap


class BaseModel:
    """The base model, loaded at most once per evaluation: its scores (when not cached) and
    the KL drift both need it. ``loaded``: a copy already in memory (the model before
    training changes it)."""

    def __init__(self, cfg: RunConfig, loaded: LoadedModel | None = None):
        self.cfg = cfg
        self._loaded = loaded

    def __call__(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_model(self.cfg.model, self.cfg.paths.cache_dir)
        return self._loaded


def drift_kl(cfg: RunConfig, tuned, tokenizer, base_answers: list[str], base) -> list[float]:
    """Per question, the mean per-token KL(base || tuned) on the base model's own answers."""
    prompts = chat_prompts(tokenizer, drift_questions(len(base_answers), cfg.paths.cache_dir))
    base_lp = answer_logprobs(base.to(next(tuned.parameters()).device), tokenizer, prompts,
                              base_answers)
    return kl_per_item(base_lp, answer_logprobs(tuned, tokenizer, prompts, base_answers))


def _base_key(cfg: RunConfig, loaded: LoadedModel, task: TaskData) -> str:
    spec = {"format": CACHE_FORMAT, "weights": loaded.fingerprint,
            # the curve's steps change when the tuned model is scored, not the base's scores
            "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items()
                     if k not in ("every_n_steps", "curve_steps")},
            "dataset": dataclasses.asdict(cfg.dataset),
            "test_ids": [getattr(i, "id", None) for i in task.test]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _base_path(cfg: RunConfig, loaded: LoadedModel, task: TaskData, part: str = "") -> Path:
    return (assets.cache_dir(cfg.paths.cache_dir) / "eval" / loaded.name /
            f"{_base_key(cfg, loaded, task)}{part}.json")


def base_cheap_scores(cfg: RunConfig, loaded: LoadedModel, task: TaskData,
                      base_model: BaseModel | None = None) -> dict[str, Any]:
    """The base model's ``score_cheap`` with its drift answers, cached on its own: what a
    curve along training needs (no benchmarks, no BFCL generation), and the part of
    ``base_scores`` that the curve's points are paired with."""
    path = _base_path(cfg, loaded, task, ".cheap")
    with atomic.cache_lock(path):
        if path.exists():
            log.info("evaluate: base scores (no generation) from cache %s", path)
            return json.loads(path.read_text())
        base = (base_model or BaseModel(cfg))()
        scores = score_cheap(cfg, base.model, base.tokenizer, task, answers=True)
        atomic.write_json(path, scores)
        return scores


def base_scores(cfg: RunConfig, loaded: LoadedModel, task: TaskData,
                base_model: BaseModel | None = None) -> dict[str, Any]:
    """The base model's ``score_model``, cached; its ``score_cheap`` part is cached on its own
    too (``base_cheap_scores``): taken from there when a curve computed it, else computed
    with the rest (sharing BFCL's prompt passes) and written there."""
    path = _base_path(cfg, loaded, task)
    with atomic.cache_lock(path):  # jobs sharing the cache score the base once
        if path.exists():
            log.info("evaluate: base scores from cache %s", path)
            return json.loads(path.read_text())
        cheap_path = _base_path(cfg, loaded, task, ".cheap")
        with atomic.cache_lock(cheap_path):
            cheap = json.loads(cheap_path.read_text()) if cheap_path.exists() else None
        if cheap is not None:
            log.info("evaluate: base scores (no generation) from cache %s", cheap_path)
        base = (base_model or BaseModel(cfg))()
        scores, computed = score_model_and_cheap(cfg, base.model, base.tokenizer, task, cheap)
        if cheap is None:
            with atomic.cache_lock(cheap_path):  # a curve's job may have written it meanwhile
                if not cheap_path.exists():
                    atomic.write_json(cheap_path, computed)
        atomic.write_json(path, scores)
        return scores


def _with_ci(out: dict[str, float], key: str, before: list[float] | None,
             after: list[float] | None) -> None:
    if before is not None and after is not None and len(before) == len(after):
        out[f"{key}/ci_low"], out[f"{key}/ci_high"] = paired_delta_ci(before, after)


def flat_metrics(task_name: str, before: dict, after: dict, primary: str) -> dict[str, float]:
    """Flat before/after/delta metrics, the deltas' 95% intervals, and Avg forgetting.

    ``forgetting/avg`` is over every measure with a non-zero base score: the benchmarks'
    ``primary`` metric (higher is better) and the bits-per-byte sets (lower is better, sign
    flipped); ``forgetting/avg_benchmarks`` is the paper's (benchmarks only).
    """
    bi, ai = before.get("items", {}), after.get("items", {})
    out: dict[str, float] = {}
    for metric, value in after["task"].items():
        if metric == "n":
            continue
        key = f"task/{task_name}/{metric}"
        out[f"{key}/before"] = before["task"][metric]
        out[f"{key}/after"] = value
        out[f"{key}/delta"] = value - before["task"][metric]
        _with_ci(out, f"{key}/delta", bi.get(key), ai.get(key))
        categories = category_keys(ai, key)
        if key not in ai and categories and all(
                bi.get(c) is not None and len(bi[c]) == len(ai[c]) for c in categories):
            # A mean over categories (the BFCL measures): items resampled by category.
            out[f"{key}/delta/ci_low"], out[f"{key}/delta/ci_high"] = stratified_delta_ci(
                {c: bi[c] for c in categories}, {c: ai[c] for c in categories})
    gold = f"task/{task_name}/gold_bpb"
    if gold in ai and gold in bi:
        # The task axis: how much lower the gold answers' bits per byte went, in % of the base.
        reduction = gold_reduction_pct(bi[gold], ai[gold])
        out[f"{gold}/reduction_pct"] = reduction[0]
        out[f"{gold}/reduction_pct/ci_low"], out[f"{gold}/reduction_pct/ci_high"] = reduction[1:]
    primary_before, primary_after, items_before, items_after = {}, {}, {}, {}
    for bench, metrics in after["bench"].items():
        for metric, value in metrics.items():
            b = before["bench"][bench][metric]
            key = f"bench/{bench}/{metric}"
            out[f"{key}/before"], out[f"{key}/after"], out[f"{key}/delta"] = b, value, value - b
            _with_ci(out, f"{key}/delta", bi.get(key), ai.get(key))
        m = primary_metric(bench, metrics, primary)
        primary_before[bench], primary_after[bench] = before["bench"][bench][m], metrics[m]
        items_before[bench], items_after[bench] = bi.get(f"bench/{bench}/{m}"), ai.get(f"bench/{bench}/{m}")
    signs = {}
    for name, value in after.get("bpb", {}).items():
        key = f"bpb/{name}"
        b = before["bpb"][name]
        out[f"{key}/before"], out[f"{key}/after"], out[f"{key}/delta"] = b, value, value - b
        _with_ci(out, f"{key}/delta", bi.get(key), ai.get(key))
        primary_before[key], primary_after[key] = b, value
        items_before[key], items_after[key] = bi.get(key), ai.get(key)
        signs[key] = -1.0
    if "drift/format_damage" in ai:
        key = "drift/format_damage"
        b, a = _mean(bi.get(key, [])), _mean(ai[key])
        out[f"{key}/before"], out[f"{key}/after"], out[f"{key}/delta"] = b, a, a - b
        _with_ci(out, f"{key}/delta", bi.get(key), ai[key])
    if "drift/kl" in ai:
        kl = [v for v in ai["drift/kl"] if v == v]
        out["drift/kl/after"] = _mean(kl)
        _with_ci(out, "drift/kl", [0.0] * len(kl), kl)
    _forgetting(out, "forgetting/avg_benchmarks",
                {b: primary_before[b] for b in after["bench"]},
                {b: primary_after[b] for b in after["bench"]}, items_before, items_after, {})
    _forgetting(out, "forgetting/avg", primary_before, primary_after, items_before, items_after,
                signs)
    _forgetting(out, "forgetting/avg_bpb", {k: primary_before[k] for k in signs},
                {k: primary_after[k] for k in signs}, items_before, items_after, signs)
    return out


def gold_reduction_pct(before: list[float], after: list[float]) -> tuple[float, float, float]:
    """``100 (mean(before) - mean(after)) / mean(before)`` and its 95% paired interval."""
    value = forgetting_avg({"gold": _mean(before)}, {"gold": _mean(after)})
    low, high = forgetting_avg_ci({"gold": before}, {"gold": after})
    return value, low, high


def _forgetting(out, key, before, after, items_before, items_after, signs) -> None:
    if not before:
        return
    # Relative forgetting is undefined where the base scores 0: leave those out, say so.
    zero = sorted(b for b, v in before.items() if v == 0)
    if zero:
        log.warning("%s leaves out %s: the base model scores 0 there", key, zero)
    kept = [b for b in before if b not in zero]
    if not kept:
        out[key] = float("nan")
        return
    out[key] = forgetting_avg({b: before[b] for b in kept}, {b: after[b] for b in kept}, signs)
    if all(items_before.get(b) is not None and items_after.get(b) is not None for b in kept):
        out[f"{key}/ci_low"], out[f"{key}/ci_high"] = forgetting_avg_ci(
            {b: items_before[b] for b in kept}, {b: items_after[b] for b in kept}, signs)


def run_evaluate(cfg: RunConfig, loaded: LoadedModel, task: TaskData, output_dir: Path,
                 final_point: dict[str, Any] | None = None) -> dict[str, float]:
    """Score the base (cached) and the tuned model, write ``metrics.json`` and ``items.json``.
    ``final_point``: the curve's point at the step training ended; its gold bits per byte,
    bits-per-byte sets and KL are this model's, so they are not computed again. Only in fp32:
    there, merging an adapter into the weights changes them by rounding alone (~1e-7), while
    in a 16-bit model the merged weights round differently from what the point measured."""
    base = BaseModel(cfg)
    before = base_scores(cfg, loaded, task, base)
    if final_point is not None and next(loaded.model.parameters()).dtype != torch.float32:
        final_point = None
    cheap = None
    if final_point is not None:
        log.info("evaluate: gold bits per byte, bits-per-byte sets and KL from the curve's "
                 "point at step %d (the model this stage scores)", final_point["step"])
        cheap = cheap_from_point(cfg, loaded.model, loaded.tokenizer, task, final_point)
    after = score_model(cfg, loaded.model, loaded.tokenizer, task, cheap)
    if before.get("drift", {}).get("answers") and "drift/kl" not in after["items"]:
        after["items"]["drift/kl"] = drift_kl(cfg, loaded.model, loaded.tokenizer,
                                              before["drift"]["answers"], base().model)
    metrics = flat_metrics(task.name, before, after, cfg.eval.forgetting_metric)
    atomic.write_json(output_dir / "metrics.json", metrics, indent=2, sort_keys=True)
    items = {key: {"before": before.get("items", {}).get(key), "after": values}
             for key, values in after["items"].items()}
    atomic.write_json(output_dir / "items.json", items, sort_keys=True)
    log.info("evaluate: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                                       if k.endswith(("/after", "avg"))))
    return metrics
