"""method=corda: peft's CorDA-KPM init on the tiny Llama, its cache, its export, bad input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from loki_exp.config_check import check_section
from loki_exp.errors import LokiError
from loki_exp.implant import methods
from tests.support.caches import linked_cache
from tests.support.tolerances import assert_close_fp32

N_QUESTIONS = 16  # enough tokens (~500) for 64/96-wide inputs; the default 256 is for real runs


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls: on a shared 2-core box the second thread's hand-off costs ~10x the work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(compose_cfg, *overrides):
    return compose_cfg("model=tiny_llama", "method=corda",
                       f"method.covariance.samples={N_QUESTIONS}", *overrides).method


def _fresh(loaded):
    """A copy to prepare: CorDA rewrites the base weights, the session's model must stay."""
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))


def _prepare(cfg, loaded, cache, calls=None):
    """methods.prepare, counting the forwards of the base model (its passes over the questions)."""
    handle = loaded.model.register_forward_hook(lambda *_: calls.append(1)) if calls is not None else None
    try:
        return methods.prepare(cfg, loaded.model, None, loaded=loaded, cache_dir=cache)
    finally:
        if handle:
            handle.remove()


def _ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "who wrote hamlet"}],
                                         add_generation_prompt=True, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def test_corda_trains_only_adapters_and_starts_as_the_base_model(compose_cfg, tiny_models, tmp_path):
    loaded = _fresh(tiny_models["tiny_llama"])
    base = copy.deepcopy(loaded.model)
    linears = _linears(base)
    assert len(linears) == 21  # 7 per layer x 3
    model = _prepare(_cfg(compose_cfg), loaded, linked_cache(tmp_path / "cache"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 16 * sum(
        m.in_features + m.out_features for m in linears.values())  # rank 16 on all 21
    # Unlike LoRA (B = 0), A and B are both non-zero: the base weight is the residual
    # W - s B A (peft's corda_init), which is what keeps the function unchanged.
    for name, m in linears.items():
        layer = model.get_submodule(f"base_model.model.{name}")
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        assert b.abs().min() > 0 and a.abs().min() > 0
        assert not torch.allclose(layer.base_layer.weight, m.weight, atol=1e-3)
        torch.testing.assert_close(layer.base_layer.weight + s * b @ a, m.weight, atol=1e-5, rtol=0)
    ids = _ids(loaded.tokenizer)
    with torch.no_grad():
        want, got = base(input_ids=ids).logits, model(input_ids=ids).logits
    assert want.abs().max() > 0.1
    assert_close_fp32(got, want, "CorDA at init vs the base")  # two float32 paths


def test_cache_is_written_once_keyed_and_reused(compose_cfg, tiny_models, tmp_path):
    cache = linked_cache(tmp_path / "cache")
    folder = cache / "corda" / "tiny-llama"
    calls: list[int] = []
    first = _prepare(_cfg(compose_cfg), _fresh(tiny_models["tiny_llama"]), cache, calls)
    assert len(calls) == N_QUESTIONS  # one forward per question
    [path] = folder.glob("*.pt")
    assert not list(folder.glob(".*.tmp.pt"))  # the temporary name was renamed
    stamp = path.stat().st_mtime_ns
    calls.clear()
    second = _prepare(_cfg(compose_cfg), _fresh(tiny_models["tiny_llama"]), cache, calls)
    assert calls == [] and path.stat().st_mtime_ns == stamp
    assert second.peft_config["default"].corda_config.cache_file == str(path)
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # The FSDP export's fresh copy repeats the trained model's init from the same file.
    like = _fresh(tiny_models["tiny_llama"])
    calls.clear()
    handle = like.model.register_forward_hook(lambda *_: calls.append(1))
    copied = methods.prepare(_cfg(compose_cfg), like.model, None, like=first)
    handle.remove()
    copy_state = copied.state_dict()
    assert calls == [] and copy_state.keys() == one.keys()
    assert all(torch.equal(v, one[k]) for k, v in copy_state.items())
    # Another rank is another decomposition: a second file, the questions run again.
    _prepare(_cfg(compose_cfg, "method.rank=4"), _fresh(tiny_models["tiny_llama"]), cache, calls)
    assert len(calls) == N_QUESTIONS and len(list(folder.glob("*.pt"))) == 2


def test_export_merges_into_a_plain_model(compose_cfg, tiny_models, tmp_path):
    loaded = _fresh(tiny_models["tiny_llama"])
    base_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    cfg = _cfg(compose_cfg)
    model = _prepare(cfg, loaded, linked_cache(tmp_path / "cache"))
    with torch.no_grad():  # stand-in for training: move every B
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(0.01)
    ids = _ids(loaded.tokenizer)
    with torch.no_grad():
        live = model(input_ids=ids).logits
    plain = methods.merge(cfg, model)
    assert type(plain).__name__ == "LlamaForCausalLM"
    state = plain.state_dict()
    assert state.keys() == base_state.keys()
    changed = {k for k in state if not torch.equal(state[k], base_state[k])}
    assert changed == {f"{n}.weight" for n in _linears(plain)}
    with torch.no_grad():
        assert_close_fp32(plain(input_ids=ids).logits, live, "merged vs live adapter")


def test_bad_covariance_source_and_rank(compose_raw, tiny_models):
    cfg = _cfg(compose_raw, "method.covariance.source=wikipedia")
    message = r"method.covariance.source='wikipedia' is not known; expected one of \['naturalqs_open'\]"
    with pytest.raises(LokiError, match=message):
        check_section("method", cfg)
    loaded = tiny_models["tiny_llama"]
    with pytest.raises(LokiError, match=message):  # refused before any weight is touched
        methods.prepare(cfg, loaded.model, None, loaded=loaded)
    with pytest.raises(LokiError, match=r"method.rank=0 must be a positive integer"):
        check_section("method", _cfg(compose_raw, "method.rank=0"))
    check_section("method", _cfg(compose_raw))  # the shipped defaults pass
