"""Knowledge Vector Attribution: integrated gradients of every down_proj row, per layer.

For one prompt, ``F = softmax(logits_last)[t*]`` with ``t*`` the model's own argmax next
token. For layer ``l`` the down_proj output ``z_l`` is moved along a straight path from a
baseline ``z'_l`` while every other layer runs normally, and

    Attr[l, j] = (z_l - z'_l)[last, j] * sum_k w_k * dF(z'_l + a_k (z_l - z'_l)) / dz_l[last, j]

with ``(a_k, w_k)`` from Captum's approximation methods. Two engines compute it:

``FastKVA`` (default) is exact and uses these shortcuts, none of which Captum offers for a
per-layer path (which is why this part is hand-written):

- the hidden state entering layer ``l+1`` of a scaled run is ``mid_l + branch_l(z_scaled)``,
  where ``mid_l = h_{l+1} - branch_l(z_l)`` is the clean residual before layer ``l``'s MLP add
  and ``branch_l`` is what the block applies to ``z`` before adding it (identity, or Gemma 2/3
  and OLMo 2's post-feedforward norm; ``decoder_view.py``), so only layers ``l+1..L`` re-run
  and no parameter needs a gradient;
- all ``m`` integration points run as one batch;
- the gradient w.r.t. ``z_l[last]`` flows only through the last token (causal attention),
  so the earlier positions of a scaled run are computed once without autograd, only for
  their keys/values (the last layer runs its attention alone: its MLP output is unused);
- points at ``alpha = 1`` are the clean run: their keys/values come from the clean pass;
- the template prefix every probe prompt shares has the same scaled keys/values in every
  prompt, so they are computed once (``set_shared_prefix``);
- the scaled last tokens of a group of layers run as one batch of streams over their own
  prefix caches: one call per decoder layer, one ``lm_head`` call (last position only)
  and one backward per group instead of one per layer.

Which decoders it accepts and what it takes from them (norms, sliding windows, rotary tables,
logit soft-capping) is in ``decoder_view.py``; every engine checks its own path against the
model's forward on a short input before any work (``FastKVA.self_check``).

``CaptumKVA`` is the reference: one Captum attribution per layer (``LayerIntegratedGradients``
on ``down_proj`` for the ``token`` baseline, as the original code does;
``IntegratedGradients`` on the injected down_proj output for ``zero``).

``scale_positions="last"`` (the published preset: the first commit's definition, docs/method.md)
is a different quantity: only the last position's ``z_l`` is scaled, so the earlier positions
keep their clean keys/values and each layer needs just ``m`` single-token streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from loki_exp.kva.captum_reference import CaptumKVA
from loki_exp.kva.decoder_view import DecoderView, capture_block_inputs, refuse
from loki_exp.kva.fast_all_positions import AllPositions
from loki_exp.kva.fast_last_position import LastPosition
from loki_exp.kva.passes import capture_outputs, target_of
from loki_exp.kva.settings import Attribution, KVASettings

# Attribution and KVASettings (kva/settings.py) are re-exported: callers build an engine from here.
__all__ = ["Attribution", "CaptumKVA", "FastKVA", "KVASettings", "build_engine"]


class _StopAfterAttention(Exception):
    """Raised on entry to a block's MLP when only the keys/values its attention wrote are needed."""


@dataclass
class _Clean:
    layer_out: list[torch.Tensor]  # each block's output [1, S, D]
    z: list[torch.Tensor]          # each down_proj output [1, S, D]
    cache: DynamicCache            # every position's keys/values, sliding layers too
    logits_last: torch.Tensor
    tables: list[tuple[torch.Tensor, ...]]  # rotary tables each block received


class FastKVA(AllPositions, LastPosition):
    """Exact KVA with the shortcuts in the module docstring."""

    # Layers whose scaled last tokens run as one batch (one call per decoder layer, one
    # lm_head call, one backward); bounds the keys/values held at once.
    STREAM_GROUP = 8
    # The self-check's agreement with the model's own forward, by compute dtype.
    CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-2,
                       torch.bfloat16: 1e-1}

    def __init__(self, model: nn.Module, settings: KVASettings, check: bool = True):
        self.model = model
        self.settings = settings
        self.view = DecoderView.of(model)
        self.layers = self.view.layers
        self.projs = self.view.projs
        alphas, weights = settings.quadrature()
        param = next(model.parameters())
        self.alphas = torch.tensor(alphas, dtype=param.dtype, device=param.device)
        self.weights = torch.tensor(weights, dtype=torch.float32, device=param.device)
        # Points at alpha = 1 are the clean run: their prefix keys/values come from it.
        self.clean_rows = [k for k, a in enumerate(alphas) if a == 1.0]
        self.run_rows = [k for k in range(len(alphas)) if k not in self.clean_rows]
        self.set_shared_prefix(None)
        if check:
            self.self_check()

    # -- clean passes --------------------------------------------------------------------
    @torch.no_grad()
    def _clean(self, input_ids: torch.Tensor, padding: dict | None = None) -> _Clean:
        """Each layer's output and down_proj output, the KV cache, the last logits [B, V].

        ``padding``: ``attention_mask`` and ``position_ids`` of a left-padded batch.
        """
        cache = DynamicCache()  # no config: sliding layers keep every position (cropped per use)
        with capture_outputs(self.projs) as z_out, \
                capture_outputs(list(self.layers)) as layer_out, \
                capture_block_inputs(self.layers) as tables:
            out = self.model(input_ids, cache=cache, use_cache=True, logits_to_keep=1,
                             **(padding or {}))
        return _Clean(layer_out, z_out, cache, out.logits[:, -1], tables)

    @torch.no_grad()
    def _token_baseline(self, input_ids: torch.Tensor,
                        padding: dict | None = None) -> list[torch.Tensor]:
        with capture_outputs(self.projs) as outputs:
            self.model(torch.full_like(input_ids, self.settings.baseline_token_id),
                       use_cache=False, logits_to_keep=1, **(padding or {}))
        return outputs

    # -- running a range of layers -------------------------------------------------------
    def _masks(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
               start: int) -> dict[bool, object]:
        """Causal masks for a multi-token run, keyed by "is a sliding-window layer"."""
        config = self.model.config
        past = cache.layers[start].get_seq_length() if start < len(cache.layers) else 0
        kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=None,
                      cache=cache if past else None, position_ids=position_ids)
        if past:
            kwargs["layer_idx"] = start
        masks = {False: create_causal_mask(**kwargs)}
        if any(w is not None for w in self.view.windows[start:]):
            masks[True] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def _run_from(self, start: int, hidden: torch.Tensor, positions: torch.Tensor,
                  cache: DynamicCache, tables, use_mask: bool,
                  kv_only: bool = False) -> torch.Tensor | None:
        """Run decoder layers ``start..L-1`` on ``hidden`` at ``positions`` (1-D).

        ``tables``: the rotary tables of a clean pass that covers ``positions``. ``kv_only``:
        the caller needs only the keys/values these positions leave in the cache, so the last
        layer stops after its attention (which writes them).
        """
        if start >= len(self.layers):
            return hidden
        position_ids = positions.view(1, -1)
        # With a KV cache and a single query token every cached key is visible: no mask.
        masks = self._masks(hidden, position_ids, cache, start) if use_mask else {}
        last = len(self.layers) - 1
        for idx in range(start, len(self.layers)):
            block = self.layers[idx]
            kwargs = dict(attention_mask=masks.get(self.view.windows[idx] is not None),
                          position_embeddings=tuple(t[:, positions] for t in tables[idx]),
                          position_ids=position_ids, cache=cache, use_cache=True)
            if kv_only and idx == last:
                self._attention_only(block, hidden, kwargs)
                return None
            hidden = block(hidden, **kwargs)
        return hidden

    @staticmethod
    def _attention_only(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
        # Blocks order norms and attention differently (pre-norm, post-norm): run the block's
        # own forward and stop where its MLP would start.
        def stop(module, args):
            raise _StopAfterAttention

        handle = block.mlp.register_forward_pre_hook(stop)
        try:
            block(hidden, **kwargs)
        except _StopAfterAttention:
            pass
        finally:
            handle.remove()

    # -- attribution ---------------------------------------------------------------------
    def attribute(self, input_ids: torch.Tensor,
                  record: dict[int, torch.Tensor] | None = None,
                  layers: list[int] | None = None) -> Attribution:
        """Attributions [L, D] for one prompt ``input_ids`` [1, S] (no padding).

        ``record``: filled with each layer's target probability at the m points (self-check).
        ``layers``: attribute only these (increasing; scores [len(layers), D] in that order),
        so the self-check runs only the streams it needs.
        """
        layers = self._layer_list(layers)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("FastKVA.attribute takes one prompt of shape [1, S]")
        self._follow(input_ids.device)
        if self.settings.scale_positions == "last":
            return self._attribute_last([input_ids[0]], record, layers)[0]
        clean = self._clean(input_ids)
        target, prob = target_of(clean.logits_last[0])
        if self.settings.baseline == "zero":
            z_base = [torch.zeros_like(z) for z in clean.z]
        else:
            z_base = self._token_baseline(input_ids)
        view = self.view
        # Clean residual before each layer's MLP add; a scaled z's contribution goes back on it.
        mids = [out - view.residual_add(layer, z)
                for layer, (out, z) in enumerate(zip(clean.layer_out, clean.z))]
        deltas = [z - zb for z, zb in zip(clean.z, z_base)]
        grads = self._grads_all_positions(input_ids, mids, z_base, deltas, clean, target, record,
                                          layers)
        m = self.alphas.numel()
        scores = [deltas[layer][0, -1].float() * (g[:, 0].float() * self.weights.view(m, 1)).sum(0)
                  for layer, g in zip(layers, grads)]
        return Attribution(torch.stack(scores), target, prob)

    def _layer_list(self, layers: list[int] | None) -> list[int]:
        n = len(self.layers)
        if layers is None:
            return list(range(n))
        if list(layers) != sorted(set(layers)) or not all(0 <= i < n for i in layers):
            raise ValueError(f"layers={layers!r}: expected increasing layer numbers in 0..{n - 1}")
        return list(layers)

    def _groups(self, layers: list[int]) -> list[list[int]]:
        """``layers`` in groups whose scaled last tokens run as one batch."""
        return [layers[i:i + self.STREAM_GROUP] for i in range(0, len(layers), self.STREAM_GROUP)]

    def _follow(self, device: torch.device) -> None:
        if self.alphas.device != device:  # Lightning moved the model
            self.alphas = self.alphas.to(device)
            self.weights = self.weights.to(device)

    def attribute_batch(self, prompts: list[torch.Tensor]) -> list[Attribution]:
        """Attributions of several prompts (1-D token ids each). The last-position definition
        runs them as one left-padded batch (what fills a GPU); all positions: one by one."""
        if self.settings.scale_positions != "last":
            return [self.attribute(p.view(1, -1)) for p in prompts]
        self._follow(prompts[0].device)
        return self._attribute_last(prompts, None, self._layer_list(None))

    # -- checking the whole path against the model's own forward ----------------------------
    @torch.no_grad()
    def self_check(self, length: int = 16) -> None:
        """Refuse the model (one line, before any work) unless the engine's target
        probabilities at every integration point equal the model's own forward with that
        layer's down_proj output replaced, on a short random input (first and last layer;
        every stream from the first layer runs every later block and the logits path). Only
        their streams run, and the second layer's, which join the first's at block 2 as a
        group's streams do (one batch over several layers' prefixes)."""
        windows = [w for w in self.view.windows if w is not None]
        if windows and min(windows) + 4 <= 64:  # long enough to exercise the window
            length = max(length, min(windows) + 4)
        param = next(self.model.parameters())
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, self.view.lm_head.out_features, (1, length), generator=gen)
        ids = ids.to(param.device)
        record: dict[int, torch.Tensor] = {}
        checked = sorted({0, len(self.layers) - 1})
        run = sorted({0, min(1, len(self.layers) - 1), len(self.layers) - 1})
        saved, self._prefix_ids = self._prefix_ids, None
        try:
            with torch.enable_grad():
                target = self.attribute(ids, record, run).target_token
        finally:
            self._prefix_ids = saved
        for layer in checked:
            ref = self._reference_probs(ids, layer, target)
            err = float((record[layer].float() - ref).abs().max() / ref.abs().max())
            if not err <= self.CHECK_TOLERANCE.get(param.dtype, 1e-1):
                raise refuse(self.model.config.model_type,
                             f"its forward differs from the engine's by {err:.1e} (relative) "
                             f"at layer {layer}")

    def _reference_probs(self, ids: torch.Tensor, layer: int, target: int) -> torch.Tensor:
        """Target probability at each point with down_proj ``layer`` replaced in the model."""
        proj, m = self.projs[layer], self.alphas.numel()
        with capture_outputs([proj]) as clean:
            self.model(ids, use_cache=False, logits_to_keep=1)
        z = clean[0]
        if self.settings.baseline == "zero":
            zb = torch.zeros_like(z)
        else:
            zb = self._token_baseline(ids)[layer]
        scaled = zb + self.alphas.view(m, 1, 1) * (z - zb)
        if self.settings.scale_positions == "last":
            scaled = torch.cat([z.expand(m, -1, -1)[:, :-1], scaled[:, -1:]], dim=1)
        handle = proj.register_forward_hook(lambda module, args, out: scaled)
        try:
            logits = self.model(ids.expand(m, -1), use_cache=False, logits_to_keep=1).logits
        finally:
            handle.remove()
        return torch.softmax(logits[:, -1].float(), dim=-1)[:, target]

    def __call__(self, input_ids: torch.Tensor) -> Attribution:
        return self.attribute(input_ids)


def build_engine(model: nn.Module, settings: KVASettings) -> FastKVA | CaptumKVA:
    return FastKVA(model, settings) if settings.engine == "fast" else CaptumKVA(model, settings)
