"""Log-likelihoods of continuations with each shared context computed once.

lm-eval's log-likelihood requests (the rc benchmarks' answer choices, the bpb sets' gold
answers) are scored by ``HFLM`` one (context, continuation) sequence at a time: a 4-choice
question runs its context 4 times, few-shot sets run the same examples for every item, and
every position goes through ``lm_head`` and a full-vocabulary log-softmax though only the
continuation's are read. lm-eval has no path that shares them (its own TODO in
``HFLM._loglikelihood_tokens``), so this module does, for causal models:

1. the longest prefix common to all contexts (GSM8K's 5-shot examples: 738 of ~850 tokens)
   runs once; only where every layer attends to the whole sequence, since the contexts after
   it are left-padded in place and a sliding window would count those pads as distance;
2. each distinct context runs once (left-padded, ``batch_size`` contexts a batch, the longest
   context + choice first), and its last position's logits score every choice's first token;
3. the choices continue from their context's cache (right-padded), ``lm_head`` running on
   their positions only.

Positions are passed explicitly, so each token sees the same positions and the same tokens
as in lm-eval's one sequence: the same sums of log-probabilities and greedy flags, up to
float rounding (tests/evaluation/test_loglikelihood.py). Truncation from the left at the
model's maximum length is lm-eval's. The log-softmax is taken in at least float32.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

Request = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def common_prefix(contexts: list[tuple[int, ...]]) -> int:
    """Length of the longest prefix shared by all contexts, leaving each at least one token."""
    if len(contexts) < 2:
        return 0
    first, n = contexts[0], min(len(c) for c in contexts) - 1
    for ctx in contexts[1:]:
        n = next((i for i in range(n) if ctx[i] != first[i]), n)
    return n


def full_attention_only(config) -> bool:
    """Whether every layer's cache is transformers' plain one (no sliding window or chunk)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def truncate(context: list[int], continuation: list[int], max_length: int) -> tuple[int, ...]:
    """The context lm-eval scores: (context + continuation) cut from the left to
    ``max_length + 1`` tokens, the continuation kept whole."""
    if not context or not continuation or len(continuation) > max_length:
        raise ValueError(f"a request needs a context and a continuation of 1..{max_length} "
                         f"tokens (got {len(context)} and {len(continuation)})")
    keep = max_length + 1 - len(continuation)
    return tuple(context[-keep:])


def _forward(model, ids, mask, positions, cache, keep):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=keep)
    logits = out.logits
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)


@torch.no_grad()
def continuation_logprobs(model, requests: list[Request], max_length: int, batch_size: int,
                          pad_id: int) -> list[tuple[float, bool]]:
    """Per request, (sum of log p(continuation | context), whether greedy decoding yields the
    continuation), in the requests' order."""
    device = next(model.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        groups.setdefault(truncate(ctx, cont, max_length), []).append(i)
    # Longest sequence first, as lm-eval orders its requests: contexts batched together then
    # have choices of similar lengths too (PIQA's solutions are longer than its goals).
    contexts = sorted(groups, reverse=True,
                      key=lambda c: len(c) + max(len(requests[i][1]) for i in groups[c]))
    shared = common_prefix(contexts) if full_attention_only(model.config) else 0
    prefix_cache = None
    if shared:
        prefix_cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([contexts[0][:shared]], device=device),
              cache=prefix_cache, use_cache=True, logits_to_keep=1)
    result: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        rests = [ctx[shared:] for ctx in chunk]
        width = max(len(r) for r in rests)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(chunk), shared + width), dtype=torch.long, device=device)
        mask[:, :shared] = 1
        for row, rest in enumerate(rests):  # left-padded: every context ends at column -1
            ids[row, width - len(rest):] = torch.tensor(rest)
            mask[row, shared + width - len(rest):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        if prefix_cache is None:
            cache = DynamicCache(config=model.config)
        else:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(chunk))
        first = _forward(model, ids, mask, positions, cache, 1)[:, -1]  # [rows, vocab]
        # Every choice: its first token from the context's last position, the rest below.
        rows, conts, owners = [], [], []  # per choice of two or more tokens
        for row, ctx in enumerate(chunk):
            for i in groups[ctx]:
                cont = requests[i][1]
                result[i] = (float(first[row, cont[0]]), int(first[row].argmax()) == cont[0])
                if len(cont) > 1:
                    rows.append(row)
                    conts.append(cont)
                    owners.append(i)
        # The choices continue in sub-batches of ``batch_size`` rows sorted by length (little
        # padding: PIQA's two solutions differ by tens of tokens), each from a copy of the
        # rows of the contexts' cache it needs.
        order = sorted(range(len(rows)), key=lambda n: -len(conts[n]))
        for sub in range(0, len(order), batch_size):
            picked = order[sub:sub + batch_size]
            length = len(conts[picked[0]]) - 1
            ids = torch.full((len(picked), length), pad_id, dtype=torch.long, device=device)
            tail = torch.zeros((len(picked), length), dtype=torch.long, device=device)
            for n, k in enumerate(picked):  # right-padded: pads come after every real token
                ids[n, :len(conts[k]) - 1] = torch.tensor(conts[k][:-1])
                tail[n, :len(conts[k]) - 1] = 1
            index = torch.tensor([rows[k] for k in picked], device=device)
            rows_cache = copy.deepcopy(cache)
            rows_cache.batch_select_indices(index)
            logp = _forward(model, ids, torch.cat([mask[index], tail], -1),
                            positions[index, -1:] + 1 + torch.arange(length, device=device),
                            rows_cache, 0)
            for n, k in enumerate(picked):
                i, target = owners[k], torch.tensor(conts[k][1:], device=device)
                lp = logp[n, :len(target)]
                total, greedy = result[i]
                result[i] = (total + float(lp.gather(-1, target[:, None]).sum()),
                             greedy and bool((lp.argmax(-1) == target).all()))
    return result
