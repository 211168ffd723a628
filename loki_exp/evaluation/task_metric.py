"""The task metric on the held-out split: greedy, batched generation, scored per item.

For BFCL the score is the AST match of ``bfcl_match``; generation stops at the end-of-turn
token or ``max_new_tokens``. ``bfcl_measures`` gives the four BFCL measures of a run (README
"Task measures"), each per item and per category, from one batched generation:

- ``trained_accuracy``: held-out items of the trained categories, the same number from each;
- ``false_call_rate``: irrelevance and live_irrelevance items answered with a call (damage:
  lower is better, never averaged into a task score);
- ``transfer_accuracy``: the leaderboard's call categories that were not trained;
- ``leaderboard_accuracy``: the leaderboard's unweighted mean over its 10 categories (an
  irrelevance category's accuracy is 1 - its false-call rate), when all 10 were scored.

Each is an unweighted mean over its categories; its per-item values are kept per category
(``<measure>/<category>``), which is how the intervals resample them.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import fmean
from typing import Any

import torch

from loki_exp.data import bfcl
from loki_exp.data.bfcl import BFCLItem
from loki_exp.data.sft import IGNORE, pad_id
from loki_exp.evaluation.bfcl_match import matches, never_parses, parse_calls
from loki_exp.evaluation.drift import looks_like_call
from loki_exp.evaluation.greedy import Forced, greedy_decode, longest_first, prefix_cache, shares_prompts
from loki_exp.evaluation.loglikelihood import common_prefix
from loki_exp.progress import track


def length_batches(lengths: list[int], extra: int, batch_tokens: int) -> list[list[int]]:
    """Indices longest first, cut into batches whose key/value cache (rows x (longest prompt +
    ``extra`` new tokens)) stays within ``batch_tokens``; a prompt too long for it goes alone.
    Decoding on a CPU is bound by memory traffic: the weights once per step (so the more rows
    the better) and each row's cache (so the less padding the better)."""
    return longest_first(dict(enumerate(lengths)), lambda batch, i: (len(batch) + 1) * (
        lengths[batch[0]] + extra) <= batch_tokens)


def generate(model, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int,
             batch_tokens: int, what: str = "generation",
             settled: list[Callable[[str], bool] | None] | None = None) -> list[str]:
    """Greedy completions, batched with left padding by ``length_batches`` (longest prompts
    first), each batch's keys and values written in place (``kv_cache``) after the prefix all
    prompts share, run once, each row leaving its batch when it ends (``greedy``).
    ``settled[i](text so far)``, where given, ends conversation ``i`` early: only for a caller
    whose measure cannot change after it says so (the text is then a prefix of the full
    completion)."""
    return generate_scored(model, tokenizer, conversations, max_new_tokens, batch_tokens, what,
                           settled)[0]


def gold_after_prompt(prompt: list[int], gold: dict[str, list[int]]
                      ) -> tuple[list[int], list[bool]] | None:
    """The tokens of a rendered gold conversation (``data.sft.encode``'s ids and labels) that
    follow ``prompt``, and which of them are scored, when it begins with exactly ``prompt``'s
    tokens and scores none of them; else None."""
    ids, labels = gold["input_ids"], gold["labels"]
    if ids[:len(prompt)] != prompt or len(ids) == len(prompt) or any(
            label != IGNORE for label in labels[:len(prompt)]):
        return None
    return ids[len(prompt):], [label != IGNORE for label in labels[len(prompt):]]


def generate_scored(model, tokenizer, conversations: list[list[dict[str, str]]],
                    max_new_tokens: int, batch_tokens: int, what: str = "generation",
                    settled: list[Callable[[str], bool] | None] | None = None,
                    gold: dict[int, dict[str, list[int]]] | None = None,
                    ) -> tuple[list[str], dict[int, float]]:
    """``generate``, and for conversation ``i`` in ``gold`` (its gold answer rendered as
    training renders it: ``data.sft.encode``) the sum of -log p of its scored tokens given
    the prompt, from the prompt's own cache (``greedy.Forced``): the prompt runs once for the
    completion and for gold bits per byte. Only where ``gold_after_prompt`` splits it off the
    generation prompt and the model ``shares_prompts``; the others are left out."""
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
               for c in conversations]
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    batches = length_batches([len(e) for e in encoded], max_new_tokens, batch_tokens)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = [i for chunk in batches for i in chunk]  # greedy_decode's rows, in order
    forced = Forced({}, {})
    for row, i in enumerate(order if gold and shares_prompts(model) else ()):
        split = gold_after_prompt(encoded[i], gold[i]) if i in gold else None
        if split is not None:
            forced.tokens[row], forced.scored[row] = split
    try:
        # The prefix all prompts share (a system prompt: BFCL's is 92 of ~450 tokens) runs once.
        shared = common_prefix([tuple(e) for e in encoded])
        prefix = prefix_cache(model, encoded[0][:shared])
        shared = shared if prefix is not None else 0

        def tensors(chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            rests = [encoded[i][shared:] for i in chunk]
            width = max(len(r) for r in rests)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, rest in enumerate(rests):
                ids[row, width - len(rest):] = torch.tensor(rest)
                mask[row, width - len(rest):] = 1
            return ids.to(device), mask.to(device)

        def row_settled(row: int, tokens: list[int]) -> bool:
            check = settled[order[row]]
            return check is not None and check(tokenizer.decode(tokens, skip_special_tokens=True))

        new = greedy_decode(model, (tensors(c) for c in track(batches, what, len(batches))),
                            max_new_tokens, tokenizer.eos_token_id,
                            row_settled if settled and any(settled) else None, prefix,
                            forced)
    finally:
        model.train(was_training)
    out = dict(zip(order, new))
    return ([tokenizer.decode(out[i], skip_special_tokens=True) for i in range(len(encoded))],
            {order[row]: nll for row, nll in forced.nll.items()})


def bfcl_correct(text: str, item: BFCLItem) -> bool:
    """AST match; for an item with no right call (irrelevance), right when no call is made
    (the text is not a call list, or an empty one), as the leaderboard scores it."""
    if not item.ground_truth:
        calls = parse_calls(text)
        return calls == [] or (calls is None and not looks_like_call(text))
    return matches(text, item.ground_truth)


def bfcl_settled(item: BFCLItem) -> Callable[[str], bool]:
    """Whether ``bfcl_correct`` is the same for every continuation of a generation so far:
    for a call item, once the text can no longer parse as calls (wrong, whatever follows);
    for an irrelevance item, once it also holds a tool-call tag (``looks_like_call`` then
    holds: a false call, whatever follows). A base model's prose is settled within its first
    few words instead of running to ``max_new_tokens``. Assumes, as greedy decoding of a byte-level
    tokenizer gives, that the text so far is the start of the finished text."""
    if item.ground_truth:
        return never_parses
    return lambda text: ("<tool_call>" in text or "<function" in text) and never_parses(text)


def bfcl_accuracy(model, tokenizer, items: list[BFCLItem], max_new_tokens: int = 128,
                  batch_tokens: int = 8192, gold: dict[str, dict[str, list[int]]] | None = None,
                  ) -> tuple[float, list[dict[str, Any]]]:
    """Accuracy and per-item rows; a row's ``generated`` text stops where its score settled
    (``bfcl_settled``). ``gold``: by item id, gold conversations (``data.sft.encode``) whose
    -log p is summed from the generation's prompt caches where it can be (``generate_scored``):
    the row's ``gold_nll``."""
    wanted = {n: gold[item.id] for n, item in enumerate(items) if gold and item.id in gold}
    texts, nll = generate_scored(model, tokenizer, [i.messages for i in items], max_new_tokens,
                                 batch_tokens, "BFCL generation",
                                 [bfcl_settled(i) for i in items], wanted)
    rows = [{"id": item.id, "category": item.category, "generated": text,
             "target": item.target, "correct": bfcl_correct(text, item)}
            for item, text in zip(items, texts)]
    for n, value in nll.items():
        rows[n]["gold_nll"] = value
    return (sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")), rows


def bfcl_groups(trained: list[str]) -> dict[str, list[str]]:
    """The categories each BFCL measure draws from: the trained ones, the two irrelevance
    ones, and the leaderboard's other call categories (transfer)."""
    return {"trained": list(trained), "irrelevance": list(bfcl.IRRELEVANCE),
            "transfer": [c for c in bfcl.LEADERBOARD
                         if c not in trained and c not in bfcl.IRRELEVANCE]}


def bfcl_heldout(trained: list[str], test_fraction: float, counts: dict[str, int], cache=None,
                 ) -> dict[str, dict[str, list[BFCLItem]]]:
    """``{group: {category: held-out items}}``, ``counts[group]`` per category (0: none)."""
    return {group: bfcl.heldout_by_category(categories, test_fraction, counts[group], cache)
            for group, categories in bfcl_groups(trained).items() if counts.get(group)}


def bfcl_measures(model, tokenizer, trained: list[str], test_fraction: float, counts: dict[str, int],
                  max_new_tokens: int, batch_tokens: int, cache=None,
                  gold: dict[str, dict[str, list[int]]] | None = None,
                  ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, float]]:
    """Scores ``{measure: mean over categories, "<measure>/<category>": mean}``, per-item
    values ``{"<measure>/<category>": [...]}`` and, by item id, the gold -log p that the
    generation's prompt caches gave for ``gold``'s items (``bfcl_accuracy``); ``counts``:
    held-out items per category for ``trained``, ``irrelevance`` and ``transfer`` (0: that
    measure off)."""
    held = bfcl_heldout(trained, test_fraction, counts, cache)
    flat = [item for by_cat in held.values() for items in by_cat.values() for item in items]
    # One generation over every category (sorted by length inside): fewer, fuller batches.
    _, rows = bfcl_accuracy(model, tokenizer, flat, max_new_tokens, batch_tokens, gold)
    gold_nll = {row["id"]: row["gold_nll"] for row in rows if "gold_nll" in row}
    correct = {row["id"]: float(row["correct"]) for row in rows}
    items: dict[str, list[float]] = {}
    for group, by_cat in held.items():
        for category, cat_items in by_cat.items():
            right = [correct[i.id] for i in cat_items]
            if not right:
                continue
            if group == "irrelevance":
                items[f"false_call_rate/{category}"] = [1.0 - r for r in right]
            else:
                items[f"{group}_accuracy/{category}"] = right
            if category in bfcl.LEADERBOARD:
                items[f"leaderboard_accuracy/{category}"] = right
    if {k.split("/")[1] for k in items if k.startswith("leaderboard_")} != set(bfcl.LEADERBOARD):
        items = {k: v for k, v in items.items() if not k.startswith("leaderboard_")}
    scores = {key: fmean(values) for key, values in items.items()}  # no category is empty
    for measure in {k.split("/")[0] for k in items}:
        scores[measure] = fmean([v for k, v in scores.items() if k.startswith(f"{measure}/")])
    return scores, items, gold_nll
