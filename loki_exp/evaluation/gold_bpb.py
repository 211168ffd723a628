"""Gold-answer bits per byte of a task's held-out items: the task axis that needs no generation.

Each item is rendered exactly as training renders it (``data.sft.encode``: the chat template,
every assistant turn labelled through its end-of-turn token), and its score is

    gold_bpb = -sum log p(labelled tokens | what precedes them) / (ln 2 * UTF-8 bytes of the
               assistant turns' text)

i.e. the held-out training loss, in bits per byte of the answer (lower is better). The end-of-
turn token is counted in the numerator (stopping is part of the answer) but its marker text is
not counted as bytes. No length limit: an item longer than ``dataset.max_length`` is scored
whole. Items are batched by length (less padding), the prefix they all share (a system
prompt) runs once, and ``lm_head`` runs on the labelled positions only, as in training.
Where the evaluation also generates from an item's prompt (BFCL), its sum comes from the
generation's own prompt cache instead (``task_metric.generate_scored``): the same sum to float
rounding (tests/evaluation/test_generation.py, test_evaluate.py), one prompt pass fewer.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from loki_exp.data.sft import IGNORE, Example, PadCollator, encode, pad_id, shared_prefix
from loki_exp.model_access import output_logits


def as_example(item: Any) -> Example:
    """A held-out task item as the training example it would be (a BFCL item's target is its
    canonical call text)."""
    if isinstance(item, Example):
        return item
    return Example(item.id, item.messages, item.target, category=item.category)


def encode_gold(tokenizer, item: Any) -> dict[str, list[int]]:
    """An item's tokens and labels as gold bpb scores them (``encode``, no length limit)."""
    return encode(tokenizer, as_example(item), max_length=1 << 30)


def answer_bytes(example: Example) -> int:
    turns = [m["content"] for m in example.messages if m["role"] == "assistant"]
    return max(1, sum(len(t.encode("utf-8")) for t in [*turns, example.response]))


def gold_bpb(model, tokenizer, items: list[Any], batch_size: int = 8,
             known_nll: dict[str, float] | None = None) -> list[float]:
    """Per item, bits per byte of its gold answer given its prompt (module docstring).
    ``known_nll``: by item id, sums of -log p already taken over a generation's prompt cache;
    only the other items run here."""
    examples = [as_example(i) for i in items]
    known = known_nll or {}
    todo = [n for n, ex in enumerate(examples) if ex.id not in known]
    computed = dict(zip(todo, gold_nll(model, tokenizer, [examples[n] for n in todo],
                                       batch_size)))
    return [(computed[n] if n in computed else known[ex.id]) / (math.log(2) * answer_bytes(ex))
            for n, ex in enumerate(examples)]


def add_token_nll(sums: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                  owners: torch.Tensor) -> None:
    """Add each target token's -log p (log-softmax in at least float32: bf16 up, fp64 kept)
    to its owner's float64 sum: how gold bpb sums, here and over a generation's prompt caches
    (``greedy``)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_nll = F.cross_entropy(logits, targets, reduction="none")
    sums.index_add_(0, owners, token_nll.double())


@torch.no_grad()
def gold_nll(model, tokenizer, examples: list[Example], batch_size: int) -> list[float]:
    """Per example, the sum of -log p of its labelled tokens given what precedes them."""
    if not examples:
        return []
    encoded = [encode_gold(tokenizer, ex) for ex in examples]
    collate = PadCollator(pad_id(tokenizer))
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
    nll = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        # The shared prefix runs once; each batch continues from a copy of its cache
        # (right-padded after it, so no pad sits between two real tokens).
        shared = shared_prefix(**collate(encoded)) if len(encoded) > 1 else 0
        if shared:
            prefix = DynamicCache(config=model.config)
            model.get_decoder()(input_ids=torch.tensor([encoded[0]["input_ids"][:shared]],
                                                       device=device),
                                cache=prefix, use_cache=True)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v[:, shared:].to(device)
                     for k, v in collate([encoded[i] for i in chunk]).items()}
            cache = None
            if shared:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(chunk))
            mask = torch.cat([batch["attention_mask"].new_ones(len(chunk), shared),
                              batch["attention_mask"]], -1)
            positions = shared + torch.arange(batch["input_ids"].shape[1], device=device)
            hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask,
                                         position_ids=positions.expand(len(chunk), -1),
                                         cache=cache, use_cache=bool(shared)).last_hidden_state
            targets = batch["labels"][:, 1:]
            keep = targets != IGNORE
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=device)
            add_token_nll(sums, output_logits(model, hidden[:, :-1][keep]), targets[keep],
                          keep.nonzero()[:, 0])
            for row, i in enumerate(chunk):
                nll[i] = float(sums[row])
    finally:
        model.train(was_training)
    return nll
