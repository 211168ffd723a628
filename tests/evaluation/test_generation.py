"""Batched greedy generation: batches by cache size, keys and values written in place, and the
same tokens however the prompts are batched."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from loki_exp.evaluation.kv_cache import InPlaceCache, InPlaceLayer
from loki_exp.evaluation.task_metric import generate, length_batches
from loki_exp.models import load_model
from tests.support.tiny_decoders import MODEL_TYPES, tiny_decoder


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


def test_generation_does_not_depend_on_how_prompts_are_batched(compose_cfg):
    """SmolLM2, one prompt per batch or all in one: the same texts, in the callers' order."""
    loaded = load_model(compose_cfg("model=smollm2").model)
    conversations = [[{"role": "user", "content": text}] for text in
                     ("Name the capital of France.", "List three prime numbers.", "Hi!")]
    alone = generate(loaded.model, loaded.tokenizer, conversations, 8, batch_tokens=1)
    together = generate(loaded.model, loaded.tokenizer, conversations, 8, batch_tokens=1 << 20)
    assert alone == together
    assert len(set(alone)) == 3  # distinct answers: the order is checked too
