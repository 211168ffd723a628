"""What the fast KVA engine needs from a decoder, taken from the model itself.

``FastKVA`` re-runs decoder blocks from a layer's residual stream with a scaled ``down_proj``
output and reads the target probability from the final hidden state. That needs, per model:

- what a block adds to the residual stream for a ``down_proj`` output ``z``: ``z`` itself in
  the Llama family, ``post_feedforward_layernorm(z)`` where the MLP output is normalised
  before the add (Gemma 2/3, OLMo 2);
- each layer's attention kind: full, or a sliding window of ``w`` (Mistral, Qwen2/3 with
  sliding windows, Gemma 2/3's interleaved local layers), from transformers' own per-layer
  cache layout (``get_layer_types_and_kwargs``);
- the logits path ``lm_head(norm(h))`` with the model's final soft-capping (Gemma 2/3);
- the rotary tables each block receives: not recomputed here but captured from the clean
  pass (``capture_block_inputs``), so local/global tables (Gemma 3) come out right.

``check_fast_kva_supported`` refuses a model type outside the list before any work; the
engine also checks the whole path numerically on a short input (``FastKVA.self_check``).
Transformers has no API for "run blocks i..L on this hidden state", which is why this is
hand-written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import get_layer_types_and_kwargs

from loki_exp.errors import LokiError
from loki_exp.model_access import decoder_layers, down_projs

# Model types whose blocks FastKVA re-runs exactly (tests/kva/test_architectures.py checks each
# against Captum). Others: kva.engine=captum, which only hooks down_proj.
FAST_KVA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                  "olmo", "olmo2", "phi3")
ATTENTION_KINDS = ("full_attention", "sliding_attention")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def refuse(model_type: object, why: str) -> LokiError:
    return LokiError(f"kva.engine=fast cannot attribute model type {model_type!r} exactly "
                     f"({why}); use kva.engine=captum")


def check_fast_kva_supported(model_type: object) -> None:
    if model_type not in FAST_KVA_TYPES:
        raise refuse(model_type, f"supported: {', '.join(FAST_KVA_TYPES)}")


@dataclass
class DecoderView:
    decoder: nn.Module
    layers: nn.ModuleList
    projs: list[nn.Linear]
    branches: list[nn.Module | None]  # per layer: module applied to z before the residual add
    windows: list[int | None]         # per layer: sliding window, None for full attention
    norm: nn.Module
    lm_head: nn.Module
    softcap: float | None
    attention: str                    # the attention implementation (masks differ by kind)

    @classmethod
    def of(cls, model: nn.Module) -> DecoderView:
        config = model.config
        model_type = getattr(config, "model_type", None)
        check_fast_kva_supported(model_type)
        if getattr(config, "use_bidirectional_attention", False):
            raise refuse(model_type, "bidirectional attention")
        decoder = model.get_decoder()
        layers = decoder_layers(model)
        kinds, per_layer = get_layer_types_and_kwargs(config)
        bad = sorted({k for k in kinds[:len(layers)] if k not in ATTENTION_KINDS})
        if bad:
            raise refuse(model_type, f"attention kinds {bad}")
        windows = [kw.get("sliding_window") if kind == "sliding_attention" else None
                   for kind, kw in zip(kinds, per_layer)]
        if any(w is not None and w != getattr(config, "sliding_window", None) for w in windows):
            # transformers' mask helpers read the one config.sliding_window
            raise refuse(model_type, "per-layer sliding windows")
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise refuse(model_type, f"attention implementation {attention!r}; the engine "
                                     f"passes its own masks, which {ATTENTION_IMPLEMENTATIONS} take")
        norm = getattr(decoder, "norm", None)
        if norm is None:
            raise refuse(model_type, "no final norm at <decoder>.norm")
        return cls(decoder=decoder, layers=layers, projs=down_projs(model),
                   branches=[getattr(b, "post_feedforward_layernorm", None) for b in layers],
                   windows=windows[:len(layers)], norm=norm,
                   lm_head=model.get_output_embeddings(),
                   softcap=getattr(config, "final_logit_softcapping", None), attention=attention)

    def residual_add(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """What block ``layer`` adds to the residual stream when its down_proj outputs ``z``."""
        branch = self.branches[layer]
        return z if branch is None else branch(z)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def visible_prefix(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """The prefix keys/values [B, H, S-1, d] (or its mask [B, 1, S-1, 1]) a query at
        position S-1 attends to."""
        window = self.windows[layer]
        if window is None or keys.shape[2] < window:
            return keys
        return keys[:, :, keys.shape[2] - window + 1:]  # kv_idx > q_idx - window


@contextmanager
def capture_block_inputs(layers: nn.ModuleList) -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """The rotary tables (cos, sin) [1, S, d] each block receives, in layer order."""
    tables: list[tuple[torch.Tensor, ...]] = []

    def keep(module, args, kwargs):
        pos = kwargs.get("position_embeddings")
        if pos is None:
            raise LokiError(f"{type(module).__name__} received no position_embeddings; "
                            "use kva.engine=captum")
        tables.append(tuple(pos))

    hooks = [block.register_forward_pre_hook(keep, with_kwargs=True) for block in layers]
    try:
        yield tables
    finally:
        for h in hooks:
            h.remove()
