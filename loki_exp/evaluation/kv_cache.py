"""A key/value cache for batched greedy generation that writes in place.

transformers' ``DynamicCache`` grows each layer with ``torch.cat``: every new token copies the
whole cache (a read and a write on top of attention's read). On a CPU a decoding step is
bound by memory traffic (the weights, then the cache), so with BFCL's long prompts those
copies are a large share of it. ``StaticCache`` writes in place but attends over its whole
preallocated length at every step. No library cache does both (hence this one): it
preallocates each layer for the prompt plus ``max_new_tokens`` and hands attention a view of
the part written so far, so the keys and values attention sees, and the generated tokens, are
the same as with ``DynamicCache`` (tests/evaluation/test_generation.py). README "Task
measures" has the time it saves. For ``greedy``'s loop it can also drop rows that have ended,
stack two batches' rows (padding the shorter where pads already sit) and begin every row with
a prefix run once.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


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
        self._show()
        return self.keys, self.values

    def _show(self) -> None:
        """Hand attention views of the filled part of the buffers."""
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]

    def start_from(self, keys: torch.Tensor, values: torch.Tensor, rows: int, room: int) -> None:
        """Begin every one of ``rows`` rows with the same keys and values (a prefix all prompts
        share, run once as a batch of one), with room for ``room`` more tokens a row."""
        self.lazy_initialization(keys, values)
        _, heads, length, _ = keys.shape
        self._keys = keys.new_empty((rows, heads, length + room, keys.shape[-1]))
        self._values = values.new_empty((rows, heads, length + room, values.shape[-1]))
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self.length = length
        self._show()

    def stack(self, other: InPlaceLayer, at: int, length: int, room: int) -> None:
        """Hold ``other``'s rows then this one's, each ending at column ``length``: a side
        shorter than that gets zeros inserted at column ``at`` (masked by the caller)."""
        def stacked(theirs: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
            out = mine.new_zeros((theirs.shape[0] + mine.shape[0], mine.shape[1], length + room,
                                  mine.shape[3]))
            for part, source, filled in ((out[:theirs.shape[0]], theirs, other.length),
                                         (out[theirs.shape[0]:], mine, self.length)):
                part[:, :, :at] = source[:, :, :at]
                part[:, :, at + length - filled:length] = source[:, :, at:filled]
            return out

        self._keys = stacked(other._keys, self._keys)
        self._values = stacked(other._values, self._values)
        self.length = length
        self._show()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (greedy decoding drops finished rows: ``greedy``)."""
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._show()

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("InPlaceLayer serves greedy decoding only: it does not crop, "
                                  "repeat or reorder the batch")

    crop = batch_repeat_interleave = reorder_cache = _unsupported


class InPlaceCache(DynamicCache):
    """``DynamicCache(config=...)`` whose full-attention layers are ``InPlaceLayer``s; other
    layer kinds (sliding windows, linear attention) keep transformers' own."""

    # The layer kinds whose rows can be dropped: transformers' other kinds (linear attention's
    # states, indexers) either lack batch_select_indices or keep state it does not select.
    DROPPABLE = (InPlaceLayer, DynamicLayer, DynamicSlidingWindowLayer)

    def __init__(self, config, max_new_tokens: int):
        super().__init__(config=config)
        self.layers = [InPlaceLayer(max_new_tokens) if type(layer) is DynamicLayer else layer
                       for layer in self.layers]

    @property
    def rows_droppable(self) -> bool:
        return all(type(layer) in self.DROPPABLE for layer in self.layers)

    @property
    def in_place_only(self) -> bool:
        """Every layer attends to the whole sequence, so pads between a shared prefix and the
        rest of a prompt are only masked positions (a sliding window would count them)."""
        return all(type(layer) is InPlaceLayer for layer in self.layers)

    def stack_rows(self, other: InPlaceCache, at: int, room: int) -> tuple[int, int]:
        """Hold ``other``'s rows then this one's, both ending at the same column, with room for
        ``room`` more tokens: the columns of zeros inserted at ``at`` into ``other``'s rows
        and into this one's (the caller masks them). Full attention only (``in_place_only``)."""
        theirs, mine = other.layers[0].length, self.layers[0].length
        length = max(theirs, mine)
        for layer, source in zip(self.layers, other.layers, strict=True):
            layer.stack(source, at, length, room)
        return length - theirs, length - mine

    def start_from(self, prefix: DynamicCache, rows: int, room: int) -> None:
        """Every layer begins with ``prefix``'s keys and values (batch 1) for ``rows`` rows."""
        for layer, source in zip(self.layers, prefix.layers, strict=True):
            layer.start_from(source.keys, source.values, rows, room)
