"""Batched greedy generation: batches by cache size, keys and values written in place, rows
leaving the batch as they end, and the same tokens however the prompts are batched."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from loki_exp.evaluation.greedy import (
    Forced,
    greedy_decode,
    length_groups,
    pad_budget,
    plain_greedy,
    prefix_cache,
    shares_prompts,
)
from loki_exp.evaluation.kv_cache import InPlaceCache, InPlaceLayer
from loki_exp.evaluation.task_metric import generate, length_batches
from loki_exp.models import load_model
from tests.support.tiny_decoders import MODEL_TYPES, tiny_decoder
from tests.support.tolerances import FLOAT32_STEPS


def test_length_batches_take_every_prompt_once_longest_first_within_the_budget():
    lengths = [5, 40, 12, 40, 7, 100, 3, 12]
    batches = length_batches(lengths, extra=10, batch_tokens=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    # rows x (longest prompt + new tokens) within the budget; the 100-token prompt (110 > 120/2)
    # goes alone, and a prompt longer than the whole budget would too.
    for b in batches:
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 10) <= 120
    assert batches == [[5], [1, 3], [2, 7, 4, 0, 6]]  # 5 x (12 + 10) = 110
    assert length_batches([500, 2], extra=10, batch_tokens=100) == [[0], [1]]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_in_place_cache_generates_the_dynamic_caches_tokens(model_type):
    """Left-padded prompts longer than the sliding windows (7 tokens): the same greedy tokens
    as transformers' own cache, with every full-attention layer written in place."""
    model = tiny_decoder(model_type)
    torch.manual_seed(1)
    lengths = [19, 11, 4]
    ids = torch.full((3, max(lengths)), 2)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, 49152, (n,))
        mask[row, -n:] = 1
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                  pad_token_id=2, eos_token_id=None)
    cache = InPlaceCache(model.config, 12)
    # Transformers' full-attention layers become in-place ones; sliding windows keep theirs.
    assert [type(layer) for layer in cache.layers] == [
        InPlaceLayer if type(layer) is DynamicLayer else type(layer)
        for layer in DynamicCache(config=model.config).layers]
    with torch.no_grad():
        expected = model.generate(**common)
        got = model.generate(**common, cache=cache)
    assert torch.equal(got, expected)
    assert got.shape[1] == max(lengths) + 12
    if model_type in ("llama", "gemma2", "gemma3_text"):
        assert InPlaceLayer in {type(layer) for layer in cache.layers}


def test_in_place_layer_refuses_more_tokens_than_it_holds():
    layer = InPlaceLayer(extra=1)
    layer.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    layer.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert layer.keys.shape[-2] == 4 and float(layer.keys[0, 0, 3, 0]) == 1.0
    with pytest.raises(RuntimeError, match="holds 4 tokens; 5 were written"):
        layer.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    with pytest.raises(NotImplementedError, match="greedy decoding only"):
        layer.crop(-1)
    layer.batch_select_indices(torch.tensor([0]))  # greedy decoding drops ended rows
    assert layer.keys.shape == (1, 1, 4, 2) and layer._keys.shape == (1, 1, 4, 2)


def test_generation_does_not_depend_on_how_prompts_are_batched(compose_cfg):
    """SmolLM2, one prompt per batch or all in one: the same texts, in the callers' order."""
    loaded = load_model(compose_cfg("model=smollm2").model)
    conversations = [[{"role": "user", "content": text}] for text in
                     ("Name the capital of France.", "List three prime numbers.", "Hi!")]
    alone = generate(loaded.model, loaded.tokenizer, conversations, 8, batch_tokens=1)
    together = generate(loaded.model, loaded.tokenizer, conversations, 8, batch_tokens=1 << 20)
    assert alone == together
    assert len(set(alone)) == 3  # distinct answers: the order is checked too


def _left_padded(prompts: list[list[int]], pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(prompts), max(map(len, prompts))), pad)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, ids.shape[1] - len(prompt):] = torch.tensor(prompt)
        mask[row, ids.shape[1] - len(prompt):] = 1
    return ids, mask


def _prompts(lengths: list[int], prefix: int = 0) -> list[list[int]]:
    torch.manual_seed(1)
    shared = torch.randint(3, 49152, (prefix,)).tolist()
    return [shared + torch.randint(3, 49152, (n,)).tolist() for n in lengths]


def _alone(model, prompt: list[int], new: int, eos: int | None) -> list[int]:
    """``generate`` on one unpadded prompt, cut after its first ``eos``."""
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                         pad_token_id=2, eos_token_id=None)[0, len(prompt):].tolist()
    return out[:out.index(eos) + 1] if eos in out else out


def _exact(model_type: str):
    # float64 leaves no near-ties for padding to flip; Gemma 2's eager attention makes a fully
    # masked (pad) row NaN in float64 (README, noticed), so it stays in float32.
    model = tiny_decoder(model_type)
    return model if model_type == "gemma2" else model.double()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_decode_drops_ended_rows_and_keeps_generates_tokens(model_type):
    """Rows that meet the end-of-turn token leave the batch (and the cache) while the others
    go on: every row's tokens equal ``generate``'s up to its end; with the rows kept (a cache
    kind that cannot drop them) too."""
    model = _exact(model_type)
    prompts = _prompts([19, 11, 4, 9])
    eos = _alone(model, prompts[0], 12, None)[3]  # row 0 ends at its 4th token at the latest
    expected = [_alone(model, p, 12, eos) for p in prompts]
    assert min(map(len, expected)) <= 4 < max(map(len, expected))  # someone ends early
    with torch.no_grad():
        assert greedy_decode(model, [_left_padded(prompts)], 12, eos) == expected
        with mock.patch.object(InPlaceCache, "DROPPABLE", ()):
            assert greedy_decode(model, [_left_padded(prompts)], 12, eos) == expected


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_rows_left_over_join_the_next_batch_after_a_prefix_run_once(model_type):
    """Three batches of two rows after a 9-token prefix they share (longer than the sliding
    windows): rows settled early leave the first two batches half empty, so their other rows
    join the next batch, twice (full-attention models; the others run each batch alone, the
    prefix with every prompt). Every row's tokens equal ``generate``'s on its whole prompt
    alone."""
    model = _exact(model_type)
    rests = _prompts([6, 9, 8, 7, 9, 6], prefix=9)  # lengths within 1.5x: joined
    prefix, rests = rests[0][:9], [r[9:] for r in rests]
    expected = [_alone(model, prefix + r, 10, None) for r in rests]
    ends = {0: 2, 2: 2, 3: 4, 4: 2}  # row: settled at this many tokens
    expected = [e[:ends.get(row, 10)] for row, e in enumerate(expected)]
    cache = prefix_cache(model, prefix)
    full_attention = InPlaceCache(model.config, 0).in_place_only
    assert (cache is not None) == full_attention
    batches = [_left_padded(rests[i:i + 2] if cache else [prefix + r for r in rests[i:i + 2]])
               for i in range(0, 6, 2)]
    with mock.patch.object(InPlaceLayer, "stack", autospec=True, side_effect=InPlaceLayer.stack
                           ) as stack, torch.no_grad():
        got = greedy_decode(model, batches, 10, None,
                            lambda row, tokens: ends.get(row) == len(tokens), cache)
    assert got == expected
    assert stack.call_count == (2 * model.config.num_hidden_layers if full_attention else 0)


def test_rows_left_over_finish_alone_when_joining_costs_more_than_it_saves():
    """Joining a 3-token batch would pad its 2 rows to the 30-token rows' length, more than the
    budget (patched down to 40 pads; SmolLM2's is ~11,700): the rows left over run to their
    end first, then the next batch; the same tokens either way."""
    model = _exact("llama")
    assert pad_budget(model) == sum(p.numel() for p in model.parameters()) // (2 * 4 * 2 * 8)
    prompts = _prompts([30, 28, 3, 2])
    expected = [_alone(model, p, 8, None) for p in prompts]
    expected[0] = expected[0][:2]
    batches = [_left_padded(prompts[:2]), _left_padded(prompts[2:])]
    with mock.patch.object(InPlaceLayer, "stack", autospec=True) as stack, \
            mock.patch("loki_exp.evaluation.greedy.pad_budget", return_value=40), torch.no_grad():
        got = greedy_decode(model, batches, 8, None, lambda row, tokens: row == 0 and len(tokens) == 2)
    assert got == expected and stack.call_count == 0


def test_greedy_decode_ends_a_settled_row_and_no_other():
    model = tiny_decoder("llama")
    batch = _left_padded(_prompts([19, 11, 4]))
    full = greedy_decode(model, [batch], 10, None)
    assert all(len(tokens) == 10 for tokens in full)
    seen = []

    def settled(row, tokens):
        seen.append(row)
        return row == 1 and len(tokens) == 3

    got = greedy_decode(model, [batch], 10, None, settled)
    assert got == [full[0], full[1][:3], full[2]]
    # row 1 is asked no more once settled; no row is asked at its last token
    assert seen.count(1) == 3 and seen.count(0) == 9
    assert greedy_decode(model, [batch], 0, None) == [[], [], []]


def test_a_row_that_ended_on_its_first_token_stays_ended_when_its_batch_joins():
    """Batch 2's row 3 is settled at its first token while it is only one of 5 rows (ended
    rows leave at a quarter), and batch 1's last row joins batch 2: row 3 keeps its one token."""
    model = _exact("llama")
    prompts = _prompts([9, 8, 7, 7, 6, 6, 5])
    expected = [_alone(model, p, 6, None) for p in prompts]
    ends = {0: 2, 3: 1}
    expected = [e[:ends.get(row, 6)] for row, e in enumerate(expected)]
    batches = [_left_padded(prompts[:2]), _left_padded(prompts[2:])]
    with mock.patch.object(InPlaceLayer, "stack", autospec=True, side_effect=InPlaceLayer.stack
                           ) as stack, torch.no_grad():
        got = greedy_decode(model, batches, 6, None, lambda row, tokens: ends.get(row) == len(tokens))
    assert stack.call_count == model.config.num_hidden_layers  # one join
    assert got == expected


def test_a_model_whose_generation_config_changes_the_greedy_choice_is_decoded_by_generate():
    """A repetition penalty (Qwen2.5 sets one) changes which token greedy decoding picks; the
    loop applies none, so such a model goes through ``generate``, batch by batch."""
    model = _exact("llama")
    prompts = _prompts([9, 4, 7])
    plain = greedy_decode(model, [_left_padded(prompts)], 10, None)
    assert plain_greedy(model) and prefix_cache(model, prompts[0][:3]) is not None
    prefix = prefix_cache(model, prompts[0][:3])
    model.generation_config.repetition_penalty = 5.0
    assert not plain_greedy(model) and prefix_cache(model, prompts[0][:3]) is None
    with pytest.raises(ValueError, match="a shared prefix needs plain greedy decoding"):
        greedy_decode(model, [_left_padded(prompts)], 10, None, prefix=prefix)
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                              do_sample=False, pad_token_id=2)[:, ids.shape[1]:].tolist()
        got = greedy_decode(model, [(ids, mask)], 10, None)
    assert got == want != plain


def _gold_nll(model, prompt: list[int], gold: list[int], scored: list[bool]) -> float:
    """-sum log p of the scored gold tokens: one forward of prompt + gold alone, float64."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + gold])).logits[0].double(), -1)
    return -sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(gold) if scored[k])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gold_continuations_are_scored_over_the_prompt_cache_and_decoding_goes_on_unchanged(
        model_type):
    """The join test's three batches after a shared 9-token prefix, every row with a gold
    continuation (one longer than max_new_tokens, one of a single token, some tokens not
    scored; rows of one batch in one group and in two; rows settled early so that batches
    join), then the whole prompts with no prefix and two rows without one: every row's tokens
    are still
    ``generate``'s on its whole prompt alone, and each gold sum equals one forward of prompt +
    continuation alone (float64). A model with sliding windows (whose cache holds only the
    window) is refused with one clear error."""
    model = _exact(model_type)
    rests = _prompts([6, 9, 8, 7, 9, 6], prefix=9)
    prefix, rests = rests[0][:9], [r[9:] for r in rests]
    expected = [_alone(model, prefix + r, 10, None) for r in rests]
    ends = {0: 2, 2: 2, 3: 4, 4: 2}
    expected = [e[:ends.get(row, 10)] for row, e in enumerate(expected)]
    torch.manual_seed(2)
    # batch 1: 14 and 2 tokens (two groups); batch 2: 1 and 5; batch 3: 4 and 3 (one group,
    # the shorter padded)
    gold = {0: torch.randint(3, 49152, (14,)).tolist(), 1: [4, 6], 2: [5], 3: [7, 8, 9, 10, 11],
            4: [15, 16, 17, 18], 5: [12, 13, 14]}
    scored = {0: [True] * 14, 1: [True, True], 2: [True], 3: [False, True, True, True, False],
              4: [True, False, True, True], 5: [True] * 3}
    settle = lambda row, tokens: ends.get(row) == len(tokens)  # noqa: E731
    if not shares_prompts(model):
        batches = [_left_padded([prefix + r for r in rests[i:i + 2]]) for i in range(0, 6, 2)]
        with pytest.raises(ValueError, match="needs shares_prompts"):
            greedy_decode(model, batches, 10, None, settle, None, Forced(gold, scored))
        return
    forced = Forced(gold, scored)
    batches = [_left_padded(rests[i:i + 2]) for i in range(0, 6, 2)]
    with mock.patch.object(InPlaceLayer, "stack", autospec=True, side_effect=InPlaceLayer.stack
                           ) as stack, torch.no_grad():
        got = greedy_decode(model, batches, 10, None, settle, prefix_cache(model, prefix), forced)
    assert got == expected
    assert stack.call_count == 2 * model.config.num_hidden_layers  # the rows still join
    assert forced.nll.keys() == gold.keys()
    # float64 throughout but Gemma's norms, which compute in float32 in a float64 model: a few
    # float32 roundings (~1.2e-7 each) per value, hence FLOAT32_STEPS (tolerances.py, 1e-6).
    # An attended pad or a shifted position moves a sum by 1e-2 of itself and more.
    for row, tokens in gold.items():
        assert forced.nll[row] == pytest.approx(
            _gold_nll(model, prefix + rests[row], tokens, scored[row]), rel=FLOAT32_STEPS), row
    # Whole prompts (no shared prefix), rows 1 and 4 without a gold answer in batches with one.
    some = Forced({r: gold[r] for r in (0, 2, 3, 5)}, scored)
    whole = [_left_padded([prefix + r for r in rests[i:i + 2]]) for i in range(0, 6, 2)]
    with torch.no_grad():
        assert greedy_decode(model, whole, 10, None, settle, None, some) == expected
    assert some.nll == pytest.approx({r: forced.nll[r] for r in (0, 2, 3, 5)}, rel=FLOAT32_STEPS)


def test_length_groups_pad_each_group_to_its_longest_within_the_slack():
    lengths = {"a": 13, "b": 1, "c": 4, "d": 3, "e": 12}
    assert length_groups(lengths) == [["a", "e"], ["c", "d"], ["b"]]  # 2 x 13 <= 1.25 x 25
    assert length_groups(lengths, slack=1.0) == [["a"], ["e"], ["c"], ["d"], ["b"]]
    assert length_groups({}) == []
