"""``trainer.compile=true``: training runs through decoder layers compiled one by one.

Regional compilation (torch's recipe for models built of repeated blocks): each decoder layer
is compiled on its own and all layers share the compiled graphs (a layer splits into a few at
its uncompiled Linears), so compiling costs one layer's traces (seconds), not the whole
model's. Inside a layer, torch's inductor fuses the norms, rotary embeddings, the activation
and the attention into generated kernels. On a CPU the attention runs as transformers'
``eager`` implementation (explicit matmuls and softmax, which inductor fuses), not as
``sdpa``, whose CPU flash kernel stays a call inductor cannot fuse and, in bf16, runs at a
tenth of the matmul peak (README "Measured here": about a third of a bf16 LoKI step's
time for 6% of its FLOPs). Measured by ``benchmarks/train_step.py --compile`` (README
"Compiled layers").

What stays eager, and why:

- ``FrozenLinear`` and ``LoKILinear`` (``torch.compiler.disable`` on their forwards): their
  autograd functions keep no weight copy for backward and LoKI writes its rows into the base
  weight in place; a compiled graph would save the weight, and a module called twice in a
  step would then fail autograd's version check.
- the batch's shared prefix (``ResponseLM.share_prefix``) is off: its cache update inside a
  layer reads the layer's index, so each layer would compile its own graph (measured: three
  minutes of compiling on SmolLM2 before the first step).

On a GPU the model's own attention stays (flash kernels there are fast, and ``eager`` would
keep every layer's attention matrix for backward); nothing here was measured on a GPU.
peft's DoRA layers compile poorly (graph breaks, then torch's recompile limit runs them
uncompiled, with a warning): the same training, little gain.

Evaluations during training (curve points) run the layers uncompiled (``eager_layers``), with
the model's own attention implementation: generation's caches would compile a graph per
layer and per length.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# model -> the attention implementation it had before compiling
_COMPILED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def separate_kernel_cache() -> None:
    """Under ``ATEN_CPU_CAPABILITY`` (e.g. ``avx2`` on an AVX-512 CPU), compile into a cache of
    its own: torch's compile cache does not tell its CPU kernels apart by that setting, and
    kernels built without it, run under ``avx2``, gave NaN from the first layer norm on (tiny
    Llama, torch 2.13)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability and os.environ.get("TORCHINDUCTOR_CACHE_DIR",
                                     default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{capability}"


def _layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layers, whatever the method made of their Linears (``ResponseLM`` reaches
    the decoder the same way)."""
    return model.get_decoder().layers


def _set_compiled(layers: list[nn.Module], compiled: list | None) -> list:
    """Give each layer the forward in ``compiled`` (None: its class's); return what they had
    (the forward, not ``nn.Module.compile``'s ``__call__``, whose code every module shares)."""
    before = [layer.__dict__.get("forward") for layer in layers]
    for layer, forward in zip(layers, compiled or [None] * len(layers)):
        if forward is not None:
            layer.forward = forward
        else:
            layer.__dict__.pop("forward", None)
    return before


@contextmanager
def compiled_layers(model: nn.Module, lm: nn.Module | None = None,
                    eager_attention: bool = True) -> Iterator[None]:
    """Within the block ``model``'s decoder layers run compiled (in ``eager`` attention where
    ``eager_attention``: on a CPU), and ``lm`` (the ``ResponseLM`` training it) runs shared
    prefixes as one pass; afterwards the model is as it was."""
    layers = _layers(model)
    attention = model.config._attn_implementation
    share = getattr(lm, "share_prefix", None)
    own = None
    separate_kernel_cache()
    try:
        _COMPILED[model] = attention
        if eager_attention:
            model.set_attn_implementation("eager")
        if lm is not None:
            lm.share_prefix = False
        own = _set_compiled(layers, [torch.compile(layer.forward) for layer in layers])
        yield
    finally:
        if own is not None:
            _set_compiled(layers, own)
        # transformers wraps every decoder layer's forward in the same few functions, and
        # torch keeps a handful of graphs per function (recompile_limit) before running it
        # eagerly: drop this training's graphs, so that a sweep's next job compiles afresh.
        torch._dynamo.reset()
        model.set_attn_implementation(attention)
        _COMPILED.pop(model, None)
        if lm is not None:
            lm.share_prefix = share


@contextmanager
def eager_layers(model: nn.Module) -> Iterator[None]:
    """``model`` as it runs uncompiled, within the block (a no-op for a model that is not
    inside ``compiled_layers``)."""
    attention = _COMPILED.get(model)
    if attention is None:
        yield
        return
    layers = _layers(model)
    compiling = model.config._attn_implementation
    compiled = _set_compiled(layers, None)
    model.set_attn_implementation(attention)
    try:
        yield
    finally:
        model.set_attn_implementation(compiling)
        _set_compiled(layers, compiled)
