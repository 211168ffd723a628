"""The task metric on the held-out split: greedy, batched generation, scored per item.

For BFCL the score is the AST match of ``bfcl_match``; generation stops at the end-of-turn
token or ``max_new_tokens``.
"""

from __future__ import annotations

from typing import Any

import torch

from loki_exp.data.bfcl import BFCLItem
from loki_exp.evaluation.bfcl_match import matches, parse_calls
from loki_exp.evaluation.drift import looks_like_call
from loki_exp.progress import track


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int,
             batch_size: int, what: str = "generation") -> list[str]:
    """Greedy completions, batched with left padding, longest prompts first (less padding)."""
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
               for c in conversations]
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[int, str] = {}
    try:
        starts = range(0, len(order), batch_size)
        for start in track(starts, what, len(starts)):
            chunk = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                n = len(encoded[i])
                ids[row, width - n:] = torch.tensor(encoded[i])
                mask[row, width - n:] = 1
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row, i in enumerate(chunk):
                out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [out[i] for i in range(len(encoded))]


def bfcl_correct(text: str, item: BFCLItem) -> bool:
    """AST match; for an item with no right call (irrelevance), right when no call is made
    (the text is not a call list, or an empty one), as the leaderboard scores it."""
    if not item.ground_truth:
        calls = parse_calls(text)
        return calls == [] or (calls is None and not looks_like_call(text))
    return matches(text, item.ground_truth)


def bfcl_accuracy(model, tokenizer, items: list[BFCLItem], max_new_tokens: int = 128,
                  batch_size: int = 8) -> tuple[float, list[dict[str, Any]]]:
    texts = generate(model, tokenizer, [i.messages for i in items], max_new_tokens, batch_size,
                     "BFCL generation")
    rows = [{"id": item.id, "category": item.category, "generated": text,
             "target": item.target, "correct": bfcl_correct(text, item)}
            for item, text in zip(items, texts)]
    return (sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")), rows
