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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from loki_exp.errors import LokiError
from loki_exp.kva.decoder_view import DecoderView, capture_block_inputs, refuse
from loki_exp.model_access import down_projs
from loki_exp.upstream import captum_quadrature

BASELINES = ("zero", "token")
SCALE_POSITIONS = ("all", "last")
ENGINES = ("fast", "captum")


@dataclass(frozen=True)
class KVASettings:
    method: str = "riemann_trapezoid"
    steps: int = 7
    baseline: str = "zero"
    baseline_token_id: int = 0
    scale_positions: str = "all"
    engine: str = "fast"

    def __post_init__(self) -> None:
        supported, _ = captum_quadrature()
        if self.method not in supported:
            raise LokiError(f"kva.method={self.method!r} is not known; expected one of "
                            f"{supported}")
        min_steps = 1 if self.method == "gausslegendre" else 2
        if not isinstance(self.steps, int) or self.steps < min_steps:
            raise LokiError(f"kva.steps={self.steps!r} must be an integer >= {min_steps} "
                            f"for {self.method}")
        if self.baseline not in BASELINES:
            raise LokiError(f"kva.baseline={self.baseline!r} is not known; expected one of "
                            f"{list(BASELINES)}")
        if self.scale_positions not in SCALE_POSITIONS:
            raise LokiError(f"kva.scale_positions={self.scale_positions!r} is not known; "
                            f"expected one of {list(SCALE_POSITIONS)}")
        if self.engine not in ENGINES:
            raise LokiError(f"kva.engine={self.engine!r} is not known; expected one of "
                            f"{list(ENGINES)}")
        if self.engine == "captum" and self.scale_positions != "all":
            raise LokiError("kva.engine=captum implements only scale_positions=all")

    def quadrature(self) -> tuple[list[float], list[float]]:
        """Captum's integration points and weights (not re-derived: see docs/method.md)."""
        step_sizes, alphas = captum_quadrature()[1](self.method)
        return list(alphas(self.steps)), list(step_sizes(self.steps))


@dataclass
class Attribution:
    scores: torch.Tensor  # [L, D] float32
    target_token: int
    target_prob: float


@contextmanager
def capture_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect each module's output (first element of a tuple) during the block, in call order."""
    outputs: list[torch.Tensor] = []

    def keep(module, args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)

    hooks = [m.register_forward_hook(keep) for m in modules]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


def _target(logits_last: torch.Tensor) -> tuple[int, float]:
    probs = torch.softmax(logits_last.float(), dim=-1)
    token = int(probs.argmax())
    return token, float(probs[token])


class _StopAfterAttention(Exception):
    """Raised on entry to a block's MLP when only the keys/values its attention wrote are needed."""


@dataclass
class _Clean:
    layer_out: list[torch.Tensor]  # each block's output [1, S, D]
    z: list[torch.Tensor]          # each down_proj output [1, S, D]
    cache: DynamicCache            # every position's keys/values, sliding layers too
    logits_last: torch.Tensor
    tables: list[tuple[torch.Tensor, ...]]  # rotary tables each block received


class FastKVA:
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
                  record: dict[int, torch.Tensor] | None = None) -> Attribution:
        """Attributions [L, D] for one prompt ``input_ids`` [1, S] (no padding).

        ``record``: filled with each layer's target probability at the m points (self-check).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("FastKVA.attribute takes one prompt of shape [1, S]")
        self._follow(input_ids.device)
        if self.settings.scale_positions == "last":
            return self._attribute_last([input_ids[0]], record)[0]
        clean = self._clean(input_ids)
        target, prob = _target(clean.logits_last[0])
        if self.settings.baseline == "zero":
            z_base = [torch.zeros_like(z) for z in clean.z]
        else:
            z_base = self._token_baseline(input_ids)
        view = self.view
        # Clean residual before each layer's MLP add; a scaled z's contribution goes back on it.
        mids = [out - view.residual_add(layer, z)
                for layer, (out, z) in enumerate(zip(clean.layer_out, clean.z))]
        deltas = [z - zb for z, zb in zip(clean.z, z_base)]
        grads = self._grads_all_positions(input_ids, mids, z_base, deltas, clean, target, record)
        m = self.alphas.numel()
        scores = [d[0, -1].float() * (g[:, 0].float() * self.weights.view(m, 1)).sum(0)
                  for d, g in zip(deltas, grads)]
        return Attribution(torch.stack(scores), target, prob)

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
        return self._attribute_last(prompts)

    def _grads_all_positions(self, input_ids, mids, z_base, deltas, clean, target, record):
        """Per layer l: the scaled prefix once without autograd, for the keys/values it leaves
        in layers l+1..L (points at alpha = 1 are the clean run: their keys/values come from
        the clean cache). Then the last tokens of a group of layers run together."""
        seq = input_ids.shape[1]
        device = input_ids.device
        m = self.alphas.numel()
        alphas = self.alphas.view(m, 1, 1)
        shared = self._shared_prefix_len(input_ids)
        n_layers = len(self.layers)
        grads: list[torch.Tensor] = []
        for group_start in range(0, n_layers, self.STREAM_GROUP):
            group = list(range(group_start, min(group_start + self.STREAM_GROUP, n_layers)))
            caches: dict[int, DynamicCache] = {}
            for layer in group:
                if seq == 1 or layer + 1 == n_layers:
                    continue
                cache = caches[layer] = DynamicCache()
                with torch.no_grad():
                    if shared:
                        for idx, (keys, values) in self._prefix_kv[layer].items():
                            cache.update(keys, values, idx)
                    if shared < seq - 1:
                        rows = slice(shared, seq - 1)
                        scaled = z_base[layer][:, rows] + alphas[self.run_rows] * deltas[layer][:, rows]
                        hidden = mids[layer][:, rows] + self.view.residual_add(layer, scaled)
                        self._run_from(layer + 1, hidden, torch.arange(shared, seq - 1, device=device),
                                       cache, clean.tables, use_mask=True, kv_only=True)
                    if self.clean_rows:
                        self._insert_clean_rows(cache, clean.cache, layer + 1)

            def prefix_kv(layer: int, idx: int, caches=caches) -> tuple[torch.Tensor, torch.Tensor]:
                return caches[layer].layers[idx].keys, caches[layer].layers[idx].values

            grads += self._stream_last_tokens(group, prefix_kv, seq, mids, z_base, deltas,
                                              clean.tables, target, record)
        return grads

    def _stream_last_tokens(self, group, prefix_kv, seq, mids, z_base, deltas, tables, target,
                            record):
        """Scaled last tokens of the layers in ``group`` as one batch of streams.

        Stream (l, k) joins at layer l+1 with ``mid_l + branch_l(z_l(a_k))`` at the last
        position and attends to its own prefix keys/values ``prefix_kv(l, j)`` (cropped to the
        window in sliding-window layers); layer j runs all streams that have joined in one
        call, and one logits call and one backward serve them all (their graphs are
        independent). Returns d prob / d z_l(a_k) per layer, [m, 1, D].
        """
        m = self.alphas.numel()
        alphas = self.alphas.view(m, 1, 1)
        n_layers = len(self.layers)
        view = self.view
        last = torch.tensor([seq - 1], device=mids[0].device)
        leaves = {layer: (z_base[layer][:, -1:] + alphas * deltas[layer][:, -1:]).detach()
                  .requires_grad_(True) for layer in group}
        cache = DynamicCache()
        with torch.enable_grad():
            active, joined = None, []
            for j in range(group[0] + 1, n_layers + 1):
                if j - 1 in leaves:
                    stream = mids[j - 1][:, -1:] + view.residual_add(j - 1, leaves[j - 1])
                    active = stream if active is None else torch.cat([active, stream])
                    joined.append(j - 1)
                if j == n_layers:
                    break
                if seq > 1:
                    kv = [prefix_kv(layer, j) for layer in joined]
                    cache.update(torch.cat([view.visible_prefix(j, k) for k, _ in kv]),
                                 torch.cat([view.visible_prefix(j, v) for _, v in kv]), j)
                active = self.layers[j](active, attention_mask=None,
                                        position_embeddings=tuple(t[:, last] for t in tables[j]),
                                        position_ids=last.view(1, 1), cache=cache, use_cache=True)
            probs = torch.softmax(view.logits(active)[:, -1], dim=-1)[:, target]
            if record is not None:  # stream order: layer by layer, m points each
                record.update({layer: p.detach() for layer, p in zip(group, probs.view(-1, m))})
            return list(torch.autograd.grad(probs.sum(), [leaves[layer] for layer in group]))

    # -- the prefix shared by every probe prompt -------------------------------------------
    def set_shared_prefix(self, prefix_ids: torch.Tensor | None) -> None:
        """Token ids that every probe prompt starts with (the chat template and instruction).

        Their scaled keys/values do not depend on the rest of the prompt (causal attention),
        so they are computed once, from the prefix alone, and reused by every prompt: exact,
        and the same for a prompt whatever ran before it (resume stays bit-identical).
        """
        self._prefix_ids = None if prefix_ids is None or prefix_ids.numel() == 0 else prefix_ids
        self._prefix_kv = None

    def _shared_prefix_len(self, input_ids: torch.Tensor) -> int:
        prefix = getattr(self, "_prefix_ids", None)
        if prefix is None or self.settings.scale_positions != "all":
            return 0
        n = min(prefix.numel(), input_ids.shape[1] - 1)
        if n < 1 or not torch.equal(input_ids[0, :n].cpu(), prefix[:n].cpu()):
            return 0
        if n < prefix.numel():
            return 0  # shorter than the cached prefix: compute everything
        if self._prefix_kv is None:
            self._prefix_kv = self._build_prefix_kv(prefix.to(input_ids.device).view(1, -1))
        return n

    @torch.no_grad()
    def _build_prefix_kv(self, prefix: torch.Tensor) -> list[dict[int, tuple]]:
        clean = self._clean(prefix)
        z_base = ([torch.zeros_like(z) for z in clean.z] if self.settings.baseline == "zero"
                  else self._token_baseline(prefix))
        m = self.alphas.numel()
        alphas = self.alphas.view(m, 1, 1)[self.run_rows]
        positions = torch.arange(prefix.shape[1], device=prefix.device)
        out = []
        for layer in range(len(self.layers) - 1):
            cache = DynamicCache()
            z = clean.z[layer]
            hidden = (clean.layer_out[layer] - self.view.residual_add(layer, z)
                      + self.view.residual_add(layer, z_base[layer] + alphas * (z - z_base[layer])))
            self._run_from(layer + 1, hidden, positions, cache, clean.tables, use_mask=True,
                           kv_only=True)
            out.append({idx: (cache.layers[idx].keys, cache.layers[idx].values)
                        for idx in range(layer + 1, len(self.layers))})
        return out

    def _insert_clean_rows(self, cache, clean_cache, start):
        order = torch.tensor(self.run_rows + self.clean_rows).argsort()
        for idx in range(start, len(self.layers)):
            mine, clean = cache.layers[idx], clean_cache.layers[idx]
            n = len(self.clean_rows)
            mine.keys = torch.cat([mine.keys, clean.keys[:, :, :-1].expand(n, -1, -1, -1)])[order]
            mine.values = torch.cat([mine.values,
                                     clean.values[:, :, :-1].expand(n, -1, -1, -1)])[order]

    def _attribute_last(self, prompts: list[torch.Tensor], record=None) -> list[Attribution]:
        """The last-position definition for a batch of prompts (left-padded to one length).

        Only the last position is scaled, so every stream of a prompt attends to the same clean
        prefix: a prompt's ``m`` points of a group of layers run as that many query tokens of
        one batch row, over one copy of its prefix keys/values plus their own key (a mask
        keeps each to its own), and one logits call and one backward serve the whole batch.
        """
        device = prompts[0].device
        seq = max(p.numel() for p in prompts)
        batch = len(prompts)
        ids = torch.zeros(batch, seq, dtype=prompts[0].dtype, device=device)
        keep = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            ids[row, seq - p.numel():] = p
            keep[row, seq - p.numel():] = True
        positions = (keep.cumsum(-1) - 1).clamp(min=0)
        padding = None if bool(keep.all()) else {"attention_mask": keep.long(),
                                                 "position_ids": positions}
        clean = self._clean(ids, padding)
        probs = torch.softmax(clean.logits_last.float(), dim=-1)
        targets = probs.argmax(-1)
        if self.settings.baseline == "zero":
            z_base = [torch.zeros_like(z[:, -1:]) for z in clean.z]
        else:
            z_base = [z[:, -1:] for z in self._token_baseline(ids, padding)]
        view = self.view
        mids = [out[:, -1:] - view.residual_add(layer, z[:, -1:])
                for layer, (out, z) in enumerate(zip(clean.layer_out, clean.z))]
        deltas = [z[:, -1:] - zb for z, zb in zip(clean.z, z_base)]  # [B, 1, D]
        n_layers, m = len(self.layers), self.alphas.numel()
        # Each layer's visible clean prefix, once for all groups of layers: keys and values
        # [B, H, P, d] and which of them are real tokens [B, 1, P, 1]. Left padding's
        # keys/values are zeroed so nothing undefined meets a zero attention weight.
        prefixes = []
        for j, kv in enumerate(clean.cache.layers):
            seen = view.visible_prefix(j, keep[:, None, :-1, None])
            prefixes.append((view.visible_prefix(j, kv.keys[:, :, :-1]) * seen,
                             view.visible_prefix(j, kv.values[:, :, :-1]) * seen, seen[:, 0, :, 0]))
        grads: list[torch.Tensor] = []
        for start in range(0, n_layers, self.STREAM_GROUP):
            group = list(range(start, min(start + self.STREAM_GROUP, n_layers)))
            grads += self._last_position_streams(group, mids, z_base, deltas, prefixes,
                                                 clean.tables, positions, targets, record)
        out = []
        for row in range(batch):
            scores = [d[row, 0].float() * (g[row].float() * self.weights.view(m, 1)).sum(0)
                      for d, g in zip(deltas, grads)]
            target = int(targets[row])
            out.append(Attribution(torch.stack(scores), target, float(probs[row, target])))
        return out

    def _last_position_streams(self, group, mids, z_base, deltas, prefixes, tables, positions,
                               targets, record):
        """d prob / d z_l(a_k) [B, m, D] for the layers of ``group``: stream (l, k) joins at
        layer l+1 as a query token at its prompt's last position."""
        m = self.alphas.numel()
        view, n_layers = self.view, len(self.layers)
        leaves = {layer: (z_base[layer] + self.alphas.view(1, m, 1) * deltas[layer]).detach()
                  .requires_grad_(True) for layer in group}
        cache = DynamicCache()
        with torch.enable_grad():
            active = None
            for j in range(group[0] + 1, n_layers + 1):
                if j - 1 in leaves:
                    stream = mids[j - 1] + view.residual_add(j - 1, leaves[j - 1])  # [B, m, D]
                    active = stream if active is None else torch.cat([active, stream], dim=1)
                if j == n_layers:
                    break
                n = active.shape[1]
                keys, values, seen = prefixes[j]
                cache.update(keys, values, j)
                active = self.layers[j](
                    active, attention_mask=self._stream_mask(seen, n),
                    position_embeddings=tuple(t[:, -1:].expand(-1, n, -1) for t in tables[j]),
                    position_ids=positions[:, -1:].expand(-1, n), cache=cache, use_cache=True)
            logits = view.logits(active)  # [B, streams, V]
            index = targets.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
            probs = torch.softmax(logits, dim=-1).gather(-1, index)[..., 0]  # [B, streams]
            if record is not None:  # stream order: layer by layer, m points each
                record.update({layer: p.detach() for layer, p in zip(group, probs[0].view(-1, m))})
            return list(torch.autograd.grad(probs.sum(), [leaves[layer] for layer in group]))

    def _stream_mask(self, prefix_seen: torch.Tensor, n: int) -> torch.Tensor:
        """[B, 1, n, P + n]: each of the n stream queries sees its prompt's visible prefix and
        its own key, not the other streams' (boolean for sdpa, additive for eager)."""
        batch, prefix = prefix_seen.shape
        own = torch.eye(n, dtype=torch.bool, device=prefix_seen.device).expand(batch, n, n)
        allowed = torch.cat([prefix_seen[:, None, :].expand(batch, n, prefix), own], dim=-1)[:, None]
        if self.view.attention == "sdpa":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    # -- checking the whole path against the model's own forward ----------------------------
    @torch.no_grad()
    def self_check(self, length: int = 16) -> None:
        """Refuse the model (one line, before any work) unless the engine's target
        probabilities at every integration point equal the model's own forward with that
        layer's down_proj output replaced, on a short random input (first and last layer;
        every stream from the first layer runs every later block and the logits path)."""
        windows = [w for w in self.view.windows if w is not None]
        if windows and min(windows) + 4 <= 64:  # long enough to exercise the window
            length = max(length, min(windows) + 4)
        param = next(self.model.parameters())
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, self.view.lm_head.out_features, (1, length), generator=gen)
        ids = ids.to(param.device)
        record: dict[int, torch.Tensor] = {}
        saved, self._prefix_ids = self._prefix_ids, None
        try:
            with torch.enable_grad():
                target = self.attribute(ids, record).target_token
        finally:
            self._prefix_ids = saved
        for layer in sorted({0, len(self.layers) - 1}):
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


class CaptumKVA:
    """The reference: one Captum attribution per layer, all positions scaled.

    ``token``: ``LayerIntegratedGradients`` on ``down_proj`` with the all-token-id input as
    baseline (the original code's computation, ``multiply_by_inputs=True``). ``zero``:
    ``IntegratedGradients`` on the down_proj output injected by a forward hook, baseline 0.
    """

    def __init__(self, model: nn.Module, settings: KVASettings):
        self.model = model
        self.settings = settings
        self.projs = down_projs(model)

    def _prob(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids, use_cache=False, logits_to_keep=1).logits
        return torch.softmax(logits[:, -1].float(), dim=-1)

    def attribute(self, input_ids: torch.Tensor) -> Attribution:
        from captum.attr import IntegratedGradients, LayerIntegratedGradients

        s = self.settings
        with torch.no_grad(), capture_outputs(self.projs) as outputs:
            target, prob = _target(self.model(input_ids, use_cache=False,
                                              logits_to_keep=1).logits[0, -1])
        scores = []
        for layer, proj in enumerate(self.projs):
            if s.baseline == "token":
                lig = LayerIntegratedGradients(self._prob, proj, multiply_by_inputs=True)
                attr = lig.attribute(input_ids, baselines=torch.full_like(input_ids, s.baseline_token_id),
                                     target=target, n_steps=s.steps, method=s.method)
            else:
                def injected(z: torch.Tensor, proj=proj) -> torch.Tensor:
                    handle = proj.register_forward_hook(lambda m, i, o: z)
                    try:
                        return self._prob(input_ids.expand(z.shape[0], -1))
                    finally:
                        handle.remove()

                attr = IntegratedGradients(injected, multiply_by_inputs=True).attribute(
                    outputs[layer].detach(), baselines=0.0, target=target, n_steps=s.steps,
                    method=s.method)
            scores.append(attr[0, -1].detach().float())
        return Attribution(torch.stack(scores), target, prob)

    def __call__(self, input_ids: torch.Tensor) -> Attribution:
        return self.attribute(input_ids)


def build_engine(model: nn.Module, settings: KVASettings) -> FastKVA | CaptumKVA:
    return FastKVA(model, settings) if settings.engine == "fast" else CaptumKVA(model, settings)
