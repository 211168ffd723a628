"""``trainer.compile``: training through compiled decoder layers gives the eager loss and
gradients, and leaves the model as it was.

Tolerance: compiled and uncompiled are two float32 paths through the same arithmetic;
inductor's fused kernels sum the norms' squares, the attention's softmax and the matmuls'
products in another order, and its vectorised exp differs by a few ulp. That is the case
``CROSS_PATH_FP32`` (tests/support/tolerances.py) bounds at 1e-4 of the compared values'
scale from the worst such difference measured (126.7 float32 eps, 1.5e-5); here the largest
seen is 8e-7 (LoRA's gradients, AVX-512; the tests pass on the AVX2 kernels too). A wrong mask or a
dropped row moves these values by 1e-2 of their scale and more.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters

from loki_exp.data.tasks import load_task
from loki_exp.errors import LokiError
from loki_exp.implant.compiled import compiled_layers, eager_layers
from loki_exp.implant.loki_linear import apply_loki
from loki_exp.implant.module import ResponseLM
from loki_exp.model_access import decoder_layers
from tests.support.tiny_decoders import tiny_decoder
from tests.support.tolerances import assert_close_fp32


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 400, (3, 20))
    ids[:, :8] = ids[0, :8]  # a shared prefix, which the compiled path runs in the one pass
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0
    labels = ids.clone()
    labels[:, :10] = -100
    labels[2, 14:] = -100
    return ids, mask, labels


def _loss_and_grads(lm, model, batch):
    model.zero_grad()
    total, count = lm(*batch)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach() / count, grads


# Llama: the plain decoder, sdpa uncompiled; Qwen 2: sliding windows (through the eager
# attention's mask); Gemma 2: attention soft-capping (its tiny config runs eager attention
# uncompiled too).
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2"])
def test_compiled_layers_train_like_eager_and_restore_the_model(model_type):
    """Loss and every trained row's gradient within ``CROSS_PATH_FP32`` (float32: inductor's
    fused kernels sum in another order); the layers really ran compiled (dynamo made graphs);
    afterwards the layers, the attention implementation and prefix sharing are as before."""
    model = apply_loki(tiny_decoder(model_type).train(), [[1, 3], [0], [5, 6], [2]])
    lm = ResponseLM(model)
    batch = _batch()
    attention = model.config._attn_implementation
    loss, grads = _loss_and_grads(lm, model, batch)
    graphs = counters["stats"]["unique_graphs"]
    with compiled_layers(model, lm):
        assert model.config._attn_implementation == "eager" and not lm.share_prefix
        compiled_loss, compiled_grads = _loss_and_grads(lm, model, batch)
    assert counters["stats"]["unique_graphs"] > graphs
    assert_close_fp32(compiled_loss, loss, "loss")
    assert grads.keys() == compiled_grads.keys() and len(grads) == 4
    for name, grad in grads.items():
        assert_close_fp32(compiled_grads[name], grad, name)
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))
    assert model.config._attn_implementation == attention and lm.share_prefix


def test_a_peft_model_trains_like_eager_compiled():
    """LoRA (a peft ``PeftModel``, its base Linears frozen): the same loss and gradients, and
    the model restored; the layers and the attention are reached through the peft wrapper."""
    from omegaconf import OmegaConf

    from loki_exp.implant import methods

    cfg = OmegaConf.create({"name": "lora", "lr": 1e-3, "rank": 4, "alpha": 8,
                            "target_modules": "all-linear"})
    model = methods.prepare(cfg, tiny_decoder("llama").train(), None)
    lm = ResponseLM(model)
    batch = _batch()
    loss, grads = _loss_and_grads(lm, model, batch)
    with compiled_layers(model, lm):
        compiled_loss, compiled_grads = _loss_and_grads(lm, model, batch)
    assert_close_fp32(compiled_loss, loss, "loss")
    nonzero = [name for name, grad in grads.items() if grad.abs().max() > 0]
    assert len(nonzero) > 10  # B starts at zero, so A's gradients are zero: compare the rest
    for name in nonzero:
        assert_close_fp32(compiled_grads[name], grads[name], name)
    assert model.config._attn_implementation == "sdpa" and lm.share_prefix
    assert all("forward" not in vars(layer) for layer in model.get_decoder().layers)


def test_a_layers_own_forward_and_a_gpus_attention_are_kept():
    """A forward set on a layer before (a user's patch) is put back afterwards, and with
    ``eager_attention=False`` (training on a GPU) the model's attention stays."""
    model = tiny_decoder("llama")
    layer = decoder_layers(model)[0]
    layer.forward = patched = layer.forward
    with compiled_layers(model, eager_attention=False):
        assert model.config._attn_implementation == "sdpa"
        assert vars(layer)["forward"] is not patched
    assert vars(layer)["forward"] is patched


def test_a_cpu_capability_compiles_into_its_own_cache(monkeypatch):
    """Kernels compiled natively and then run under ``ATEN_CPU_CAPABILITY=avx2`` from the same
    cache gave NaN (every test above, on an AVX-512 CPU): each capability gets its own cache;
    a cache the user chose stays."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from loki_exp.implant.compiled import separate_kernel_cache

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    separate_kernel_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir() + "_avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/mine")
    separate_kernel_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/mine"


def test_eager_layers_pause_the_compiled_layers():
    model = tiny_decoder("llama")
    attention = model.config._attn_implementation
    with eager_layers(model):  # not compiled: nothing to pause
        assert model.config._attn_implementation == attention
    with compiled_layers(model):
        compiled = [vars(layer).get("forward") for layer in decoder_layers(model)]
        assert all(compiled)
        with eager_layers(model):
            assert model.config._attn_implementation == attention
            assert all("forward" not in vars(layer) for layer in decoder_layers(model))
        assert model.config._attn_implementation == "eager"
        assert [vars(layer).get("forward") for layer in decoder_layers(model)] == compiled


@pytest.mark.slow  # about 30 s: compiles for each new batch length until shapes go dynamic
def test_the_implant_stage_trains_the_same_rows_compiled(compose_cfg, tmp_path):
    """Two steps of the implant stage (Lightning's loop, AdamW, clipping) with and without
    ``trainer.compile``: the same trained rows within ``CROSS_PATH_FP32``, and the model that
    comes back runs uncompiled in its own attention."""
    from loki_exp.implant.fit import run_implant
    from loki_exp.models import load_model

    common = ["model=tiny_llama", "trainer.batch_size=2", "trainer.precision=32-true",
              "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=0"]
    rows = [[1, 4], [2], [3]]
    trained = []
    for compile_ in (False, True):
        cfg = compose_cfg(*common, f"trainer.compile={compile_}")
        task = load_task(cfg.dataset)
        task.train = task.train[:8]
        loaded = load_model(cfg.model)
        graphs = counters["stats"]["unique_graphs"]
        run_implant(cfg, loaded, rows, task, tmp_path / str(compile_), loggers=[])
        assert all("forward" not in vars(layer) for layer in decoder_layers(loaded.model))
        assert (counters["stats"]["unique_graphs"] > graphs) == compile_
        assert loaded.model.config._attn_implementation == "sdpa"
        trained.append([layer.mlp.down_proj.weight_rows.detach().clone()
                        for layer in decoder_layers(loaded.model)])
    for eager, compiled in zip(*trained):
        assert_close_fp32(compiled, eager, "trained rows")


def test_compile_is_refused_under_fsdp(compose_cfg):
    from loki_exp.pipeline import validate

    with pytest.raises(LokiError, match="trainer.compile=true is not available with "
                                        "parallelism fsdp"):
        validate(compose_cfg("trainer.compile=true", "parallelism=fsdp"))
