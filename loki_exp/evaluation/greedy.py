"""Greedy decoding of left-padded batches from which rows leave as they end.

``model.generate`` runs a batch until its last row stops: a row that has met its end-of-turn
token keeps being computed, as padding, for as long as the longest one runs. On a CPU a
decoding step costs about one pass over the weights plus each row's attention over its
cache, so those rows are waste, and so is a batch of a few long rows running alone.
transformers' generation can neither shrink a batch (its stopping criteria only mark rows
done) nor join two, hence this loop. It makes the same forward passes as ``generate``'s
greedy search (the same positions, masks and keys and values; the same tokens in float64,
the same up to float rounding otherwise, as batch shapes differ:
tests/evaluation/test_generation.py), but:

- a row ends when it meets the end-of-turn token, reaches ``max_new_tokens``, or when the
  caller's ``settled`` says nothing it could still generate would change what is measured of
  it (BFCL: a call item whose text can no longer parse as calls, ``bfcl_match.never_parses``);
  ended rows leave the batch, and the cache, once they are a quarter of it (dropping rows
  copies the cache);
- once half a batch's rows have ended, the rest join the next batch: their caches are stacked
  with its fresh ones, the shorter padded where pads already sit (at the start, or after a
  shared prefix) and masked, unless those pads would cost more than the pass over the
  weights they save (``pad_budget``; the rest then finish first);
- a prefix every prompt shares (a system prompt) runs once (``prefix_cache``);
- a row's gold continuation (``Forced``: the task's gold answer, for its bits per byte) can be
  scored over its prompt's cache right after the prompt runs, before decoding starts from the
  prompt: the prompt then runs once for both measures.

Joining, the shared prefix and gold continuations need every layer to attend to the whole
sequence (``kv_cache``: a sliding window would count the pads as distance, and its cache
holds only the window); elsewhere each batch runs alone and, where a layer cannot drop rows,
ended rows stay in it unread. A model whose generation config
changes greedy decoding's choice (a repetition penalty, banned or forced tokens: Qwen2.5's
sets ``repetition_penalty``) is decoded by ``generate`` itself, batch by batch, with none of
the above (``plain_greedy``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache

from loki_exp.evaluation.gold_bpb import add_token_nll
from loki_exp.evaluation.kv_cache import InPlaceCache
from loki_exp.model_access import output_logits

# Generation-config options that change which token greedy decoding picks: this loop applies
# none of them, so a model that sets one is decoded by ``generate`` (which does).
_GREEDY_OPTIONS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                   "encoder_no_repeat_ngram_size", "bad_words_ids", "sequence_bias",
                   "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens",
                   "forced_bos_token_id", "forced_eos_token_id",
                   "exponential_decay_length_penalty")


def plain_greedy(model) -> bool:
    """Whether greedy decoding of ``model`` is a plain argmax: its generation config sets none
    of ``_GREEDY_OPTIONS`` away from transformers' default."""
    config, default = getattr(model, "generation_config", None), GenerationConfig()
    return config is None or all(getattr(config, option, None) == getattr(default, option, None)
                                 for option in _GREEDY_OPTIONS)


def shares_prompts(model) -> bool:
    """Whether ``greedy_decode`` can run a shared prefix once and score gold continuations
    over a prompt's cache: every layer attends to the whole sequence (a sliding window would
    count pads as distance, and its cache holds only the window) and the model is decoded by
    this loop, not by ``generate`` (``plain_greedy``)."""
    return InPlaceCache(model.config, 0).in_place_only and plain_greedy(model)


def prefix_cache(model, prefix: list[int]) -> DynamicCache | None:
    """The keys and values of a prefix every prompt shares, run once (batch 1), for
    ``greedy_decode``; None where there is none or the model cannot share it
    (``shares_prompts``)."""
    if not prefix or not shares_prompts(model):
        return None
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prefix], device=next(model.parameters()).device)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


@dataclass
class Forced:
    """Gold continuations to score over their rows' prompts (teacher forcing): per row
    number, the tokens that follow its prompt and whether each one is scored. ``greedy_decode``
    fills ``nll`` with each such row's sum of -log p over its scored tokens, computed as
    ``gold_bpb`` computes it (``lm_head`` on the scored positions, ``add_token_nll``)."""

    tokens: dict[int, list[int]]
    scored: dict[int, list[bool]]
    nll: dict[int, float] = field(default_factory=dict)


@dataclass
class _Running:
    """Rows decoding together: their numbers, cache, mask, next positions, the tokens they
    feed next, and which have ended (they stay, unread, until they are a quarter of the
    batch, or for good where the cache cannot drop rows)."""

    rows: list[int]
    cache: InPlaceCache
    mask: torch.Tensor
    position: torch.Tensor
    chosen: torch.Tensor
    ended: list[bool]

    @property
    def live(self) -> int:
        return self.ended.count(False)


@torch.no_grad()
def greedy_decode(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  max_new_tokens: int, eos_id: int | None,
                  settled: Callable[[int, list[int]], bool] | None = None,
                  prefix: DynamicCache | None = None,
                  forced: Forced | None = None) -> list[list[int]]:
    """Each row's new tokens (its end-of-turn token included when it met one), rows numbered
    across ``batches`` in order. A batch is (input_ids, attention_mask), left-padded; with
    ``prefix`` (``prefix_cache``) they are what follows it, the pads sitting between the two.
    ``settled(row, tokens)`` may end a row early. ``forced``: gold continuations scored right
    after their prompts (needs ``shares_prompts``)."""
    if forced is not None and forced.tokens and not shares_prompts(model):
        raise ValueError("gold continuations are scored over a prompt's cache, which needs "
                         "shares_prompts(model): full attention and plain greedy decoding")
    if not plain_greedy(model):
        if prefix is not None:
            raise ValueError("a shared prefix needs plain greedy decoding: prefix_cache gives "
                             "None for a model whose generation config changes the greedy choice")
        return generate_batches(model, batches, max_new_tokens, eos_id)
    tokens: list[list[int]] = []
    ending = (tokens, max_new_tokens, eos_id, settled)
    shared = prefix.get_seq_length() if prefix is not None else 0
    budget = pad_budget(model)
    running: _Running | None = None
    batches = iter(batches)
    current = next(batches, None)
    while current is not None:
        ids, mask = current
        rows = list(range(len(tokens), len(tokens) + ids.shape[0]))
        tokens.extend([] for _ in rows)
        current = next(batches, None)
        if max_new_tokens <= 0:
            continue
        fresh = _prefill(model, ids, mask, rows, max_new_tokens, prefix, forced)
        _record(fresh, *ending)
        if running is not None and running.live:
            if _worth_joining(running, fresh, budget):
                fresh = _join(_drop_ended(running), _drop_ended(fresh), shared, max_new_tokens)
            else:  # joining would cost more in pads than it saves
                _decode(model, running, 0, ending)
        running = fresh
        last_batch = current is None or not running.cache.in_place_only
        _decode(model, running, 0 if last_batch else running.live // 2, ending)
    return tokens


def _decode(model, running: _Running, until: int, ending) -> None:
    """Greedy steps until at most ``until`` rows are live."""
    while running.live > until:
        mask = torch.cat([running.mask, running.mask.new_ones(len(running.rows), 1)], -1)
        out = model(input_ids=running.chosen[:, None], attention_mask=mask,
                    position_ids=running.position, past_key_values=running.cache,
                    use_cache=True)
        running.mask, running.position = mask, running.position + 1
        running.chosen = out.logits[:, -1].float().argmax(-1)
        _record(running, *ending)


def generate_batches(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     max_new_tokens: int, eos_id: int | None) -> list[list[int]]:
    """``generate`` on each batch of whole prompts (its generation config applied, every row
    run until the batch's last one ends), each row cut after its end-of-turn token: what
    ``greedy_decode`` hands a non-plain model to, and how generation ran before it."""
    out = []
    for ids, mask in batches:
        if max_new_tokens <= 0:
            out += [[] for _ in range(ids.shape[0])]
            continue
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             cache=InPlaceCache(model.config, max_new_tokens), do_sample=False,
                             pad_token_id=eos_id if eos_id is not None else 0,
                             eos_token_id=eos_id)[:, ids.shape[1]:].tolist()
        out += [row[:row.index(eos_id) + 1] if eos_id in row else row for row in new]
    return out


def _prefill(model, ids, mask, rows, max_new_tokens, prefix, forced) -> _Running:
    cache = InPlaceCache(model.config, max_new_tokens)
    if prefix is not None:
        cache.start_from(prefix, len(rows), ids.shape[1] + max_new_tokens)
        mask = torch.cat([mask.new_ones(len(rows), prefix.get_seq_length()), mask], dim=-1)
    # generate's positions: the count of real tokens before each one (pads get 1, unused).
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1]:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    if forced is not None and any(row in forced.tokens for row in rows):
        _score_forced(model, cache, mask, positions[:, -1] + 1, out.logits[:, -1], rows, forced)
    return _Running(rows, cache, mask, positions[:, -1:] + 1,
                    out.logits[:, -1].float().argmax(-1), [False] * len(rows))


def longest_first(lengths: dict[int, int], fits: Callable[[list[int], int], bool]
                  ) -> list[list[int]]:
    """Keys longest first, each joining the last group while ``fits(group, key)``, else
    starting the next one (groups padded to their first, longest, member)."""
    groups: list[list[int]] = []
    for key in sorted(lengths, key=lambda k: -lengths[k]):
        if groups and fits(groups[-1], key):
            groups[-1].append(key)
        else:
            groups.append([key])
    return groups


def length_groups(lengths: dict[int, int], slack: float = 1.25) -> list[list[int]]:
    """Keys longest first, cut into groups padded to their first one's length with at most
    ``slack`` times their real positions: gold answers run 10 to 300 tokens, and a batch
    padded to its longest would compute ~2.4x the real ones (BFCL's, in ``cpu_demo``)."""
    return longest_first(lengths, lambda group, key: (len(group) + 1) * lengths[group[0]]
                         <= slack * (sum(lengths[k] for k in group) + lengths[key]))


def _score_forced(model, cache: InPlaceCache, mask, start, last_logits, rows, forced: Forced
                  ) -> None:
    """Score the batch's gold continuations: each first token by its prompt's last logits,
    the rest in groups of similar length (``length_groups``), each over a copy of its rows'
    cache (right-padded, masked), so decoding then starts from the prompts untouched."""
    gold = {j: forced.tokens[row] for j, row in enumerate(rows) if forced.tokens.get(row)}
    sums = torch.zeros(len(rows), dtype=torch.float64, device=mask.device)

    def add(logits: torch.Tensor, tokens: list[int], owners: list[int]) -> None:
        add_token_nll(sums, logits, torch.tensor(tokens, dtype=torch.long, device=logits.device),
                      torch.tensor(owners, dtype=torch.long, device=sums.device))

    firsts = [j for j in gold if forced.scored[rows[j]][0]]
    add(last_logits[firsts], [gold[j][0] for j in firsts], firsts)
    for group in length_groups({j: len(g) - 1 for j, g in gold.items() if len(g) > 1}):
        width = len(gold[group[0]]) - 1
        ids = torch.zeros((len(group), width), dtype=torch.long, device=mask.device)
        running = torch.zeros((len(group), width), dtype=torch.long, device=mask.device)
        for n, j in enumerate(group):
            ids[n, :len(gold[j]) - 1] = torch.tensor(gold[j][:-1])
            running[n, :len(gold[j]) - 1] = 1
        index = torch.tensor(group, device=mask.device)
        copy = DynamicCache()
        for layer_idx, layer in enumerate(cache.layers):
            copy.update(layer.keys[index], layer.values[index], layer_idx)
        hidden = model.get_decoder()(
            input_ids=ids, attention_mask=torch.cat([mask[index], running], -1),
            position_ids=start[index, None] + torch.arange(width, device=mask.device),
            cache=copy, use_cache=True).last_hidden_state
        # the hidden state at gold token k scores token k + 1
        picked = [(n, k) for n, j in enumerate(group) for k in range(len(gold[j]) - 1)
                  if forced.scored[rows[j]][k + 1]]
        at = torch.tensor(picked, dtype=torch.long, device=mask.device).view(-1, 2)
        add(output_logits(model, hidden[at[:, 0], at[:, 1]]),
            [gold[group[n]][k + 1] for n, k in picked], [group[n] for n, _ in picked])
    for j in gold:
        forced.nll[rows[j]] = float(sums[j])


def _record(running: _Running, tokens, max_new_tokens, eos_id, settled) -> None:
    """Append each live row's chosen token and mark the rows that end. Ended rows leave the
    batch once they are a quarter of it: dropping copies the whole cache, as a few steps of
    decoding cost, so not at every row's end."""
    for j, (row, token) in enumerate(zip(running.rows, running.chosen.tolist())):
        if running.ended[j]:
            continue
        tokens[row].append(token)
        if (token == eos_id or len(tokens[row]) >= max_new_tokens
                or (settled is not None and settled(row, tokens[row]))):
            running.ended[j] = True
    if running.ended.count(True) * 4 >= len(running.rows):
        _drop_ended(running)


def _drop_ended(running: _Running) -> _Running:
    """The batch without its ended rows, where the cache can drop rows."""
    keep = [j for j, ended in enumerate(running.ended) if not ended]
    if len(keep) < len(running.rows) and running.cache.rows_droppable:
        index = torch.tensor(keep, dtype=torch.long, device=running.chosen.device)
        running.cache.batch_select_indices(index)
        running.rows = [running.rows[j] for j in keep]
        running.mask, running.position = running.mask[index], running.position[index]
        running.chosen, running.ended = running.chosen[index], [False] * len(keep)
    return running


def pad_budget(model) -> int:
    """How many (row, position) pads of keys and values one decoding step may read before
    joining two batches costs more than it saves: a decoding step reads every weight once
    and, per row, its cache, so one pass over the weights costs about as much memory traffic
    as this many cached positions (SmolLM2-135M: ~11,700)."""
    c = model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_position = 2 * c.num_hidden_layers * kv_heads * head_dim  # keys and values
    return sum(p.numel() for p in model.parameters()) // per_position


def _worth_joining(older: _Running, fresh: _Running, budget: int) -> bool:
    """Joined, the shorter side's rows attend over the pads that make up the difference at
    every step, while both sides share one pass over the weights."""
    older_length, fresh_length = older.mask.shape[1], fresh.mask.shape[1]
    pads = (fresh.live * max(0, older_length - fresh_length)
            + older.live * max(0, fresh_length - older_length))
    return pads <= budget


def _join(older: _Running, fresh: _Running, at: int, room: int) -> _Running:
    """One batch of ``older``'s rows then ``fresh``'s (ended ones dropped): the shorter side
    gets zero keys and values (masked) at column ``at`` so that both end at the same column."""
    pads = fresh.cache.stack_rows(older.cache, at, room)
    masks = [torch.cat([m[:, :at], m.new_zeros(m.shape[0], pad), m[:, at:]], -1)
             for m, pad in zip((older.mask, fresh.mask), pads)]
    return _Running(older.rows + fresh.rows, fresh.cache, torch.cat(masks),
                    torch.cat([older.position, fresh.position]),
                    torch.cat([older.chosen, fresh.chosen]), older.ended + fresh.ended)
