"""The implanting task named by the `dataset` config: train examples and a held-out split.

``bfcl`` (offline default), ``jsonl`` (a user file), and the paper's hub datasets
(``toolace``, ``reranker``; ShareGPT-style conversations) which need the hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loki_exp.data import bfcl
from loki_exp.data.sft import Example, encode
from loki_exp.errors import LokiError

if TYPE_CHECKING:
    from loki_exp.config_schema import FileDataset, HubDataset, OfflineDataset


@dataclass
class TaskData:
    name: str
    train: list[Example]
    test: list[Any]  # task items for the task metric (BFCLItem) or Examples
    skipped: dict[str, int] = field(default_factory=dict)
    test_fraction: float | None = None  # the hash split's held-out share (BFCL categories)
    categories: tuple[str, ...] = ()  # the trained call categories (BFCL)


def _bfcl_example(item: bfcl.BFCLItem) -> Example:
    answer = bfcl.NO_CALL_ANSWER if item.category in bfcl.IRRELEVANCE else item.target
    return Example(item.id, item.messages, answer, category=item.category)


def _bfcl(cfg: OfflineDataset, cache: Any, tokenizer=None) -> TaskData:
    fits = None
    if tokenizer is not None:  # irrelevance examples are drawn among those training keeps
        def fits(item: bfcl.BFCLItem) -> bool:
            return encode(tokenizer, _bfcl_example(item), cfg.max_length,
                          cfg.overflow) is not None

    split = bfcl.load_split(cfg.categories, cfg.test_fraction, cache,
                            cfg.irrelevance_share, fits)
    train = [_bfcl_example(i) for i in split.train]
    return TaskData("bfcl", train, split.test, dict(split.skipped), cfg.test_fraction,
                    tuple(cfg.categories))


def example_from_record(record: Any, where: str) -> Example:
    """``{"prompt", "response"}`` or ``{"messages": [..., {"role": "assistant", ...}]}``."""
    if not isinstance(record, dict):
        raise LokiError(f"{where}: expected a JSON object, got {type(record).__name__}")
    rid = str(record.get("id", where))
    if "messages" in record:
        msgs = record["messages"]
        if (not isinstance(msgs, list) or len(msgs) < 2 or not all(
                isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs)
                or msgs[-1]["role"] != "assistant"):
            raise LokiError(f"{where}: 'messages' must be a list of {{role, content}} turns "
                            "ending with the assistant's response")
        return Example(rid, [dict(role=m["role"], content=m["content"]) for m in msgs[:-1]],
                       msgs[-1]["content"])
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return Example(rid, [{"role": "user", "content": record["prompt"]}], record["response"])
    raise LokiError(f"{where}: expected keys 'prompt' and 'response' (strings) or 'messages'; "
                    f"found {sorted(record)}")


def _split(examples: list[Example], test_fraction: float) -> tuple[list, list]:
    if not 0 <= test_fraction < 1:
        raise LokiError(f"dataset.test_fraction={test_fraction} must be in [0, 1) "
                        "(0: train on everything, hold nothing out)")
    test = [e for e in examples if bfcl.in_test_split(e.id, test_fraction)]
    train = [e for e in examples if not bfcl.in_test_split(e.id, test_fraction)]
    return train, test


def _jsonl(cfg: FileDataset) -> TaskData:
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise LokiError(f"dataset.path={cfg.path!r} does not exist; expected a JSONL file "
                        "with one {prompt, response} or {messages} object per line")
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LokiError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        ex = example_from_record(record, f"{path}:{n}")
        if "id" not in record:
            ex.id = f"line-{n}"
        examples.append(ex)
    if not examples:
        raise LokiError(f"dataset.path={str(path)!r} holds no examples")
    train, test = _split(examples, cfg.test_fraction)
    return TaskData("jsonl", train, test)


def _sharegpt(record: dict, rid: str) -> Example:
    """ShareGPT turns (``conversations``: from/value, optional ``system``) -> Example."""
    # LlamaFactory's ShareGPT role tags: function_call is the assistant calling a tool,
    # observation the tool's answer.
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "function_call": "assistant", "system": "system", "tool": "tool",
             "function": "tool", "observation": "tool"}
    msgs = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    msgs += [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]
    while msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()
    return example_from_record({"id": rid, "messages": msgs}, rid)


def _hub(cfg: HubDataset) -> TaskData:
    try:
        from datasets import load_dataset

        ds = load_dataset(cfg.hub_id, split="train")
    except Exception as err:
        raise LokiError(
            f"dataset={cfg.name}: could not load {cfg.hub_id!r} from the hub "
            f"({type(err).__name__}). Without hub access, export it to JSONL and use "
            "dataset=jsonl dataset.path=/path/to/file.jsonl") from None
    examples = [_sharegpt(r, f"{cfg.name}-{i}") if "conversations" in r
                else example_from_record({"id": f"{cfg.name}-{i}", **r}, f"{cfg.hub_id}[{i}]")
                for i, r in enumerate(ds)]
    train, test = _split(examples, cfg.test_fraction)
    return TaskData(cfg.name, train, test)


def load_task(cfg: OfflineDataset | FileDataset | HubDataset,
              cache: str | os.PathLike | None = None, tokenizer=None) -> TaskData:
    """The ``dataset`` group's task (checked into ``config_schema``'s shape for its ``source``; the
    one offline dataset is BFCL). ``tokenizer``: the model's, when known (BFCL draws its
    irrelevance examples among those that fit ``max_length``)."""
    if cfg.source == "offline":
        return _bfcl(cfg, cache, tokenizer)
    return _jsonl(cfg) if cfg.source == "file" else _hub(cfg)
