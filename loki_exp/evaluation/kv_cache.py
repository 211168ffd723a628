"""A key/value cache for batched greedy generation that writes in place.

transformers' ``DynamicCache`` grows each layer with ``torch.cat``: every new token copies the
whole cache (a read and a write on top of attention's read). On a CPU a decoding step is
bound by memory traffic (the weights, then the cache), so with BFCL's long prompts those
copies are a large share of it. ``StaticCache`` writes in place but attends over its whole
preallocated length at every step. No library cache does both (hence this one): it
preallocates each layer for the prompt plus ``max_new_tokens`` and hands attention a view of
the part written so far, so the keys and values attention sees, and the generated tokens, are
the same as with ``DynamicCache`` (tests/evaluation/test_generation.py). README "Task
measures" has the time it saves.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class InPlaceLayer(DynamicLayer):
    """A full-attention layer's cache: a buffer of the prompt's length plus ``extra`` tokens,
    filled in place; ``keys``/``values`` are views of its filled part."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            batch, heads, _, _ = key_states.shape
            size = new + self.extra
            self._keys = key_states.new_empty((batch, heads, size, key_states.shape[-1]))
            self._values = value_states.new_empty((batch, heads, size, value_states.shape[-1]))
        if self.length + new > self._keys.shape[-2]:
            raise RuntimeError(f"InPlaceLayer holds {self._keys.shape[-2]} tokens; "
                               f"{self.length + new} were written")
        self._keys[:, :, self.length:self.length + new] = key_states
        self._values[:, :, self.length:self.length + new] = value_states
        self.length += new
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]
        return self.keys, self.values

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("InPlaceLayer serves greedy decoding only: it does not crop, "
                                  "repeat or reorder the batch")

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported


class InPlaceCache(DynamicCache):
    """``DynamicCache(config=...)`` whose full-attention layers are ``InPlaceLayer``s; other
    layer kinds (sliding windows, linear attention) keep transformers' own."""

    def __init__(self, config, max_new_tokens: int):
        super().__init__(config=config)
        self.layers = [InPlaceLayer(max_new_tokens) if type(layer) is DynamicLayer else layer
                       for layer in self.layers]
