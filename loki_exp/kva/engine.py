"""Knowledge Vector Attribution: integrated gradients of every down_proj row, per layer.

For one prompt, ``F = softmax(logits_last)[t*]`` with ``t*`` the model's own argmax next
token. For layer ``l`` the down_proj output ``z_l`` is moved along a straight path from a
baseline ``z'_l`` while every other layer runs normally, and

    Attr[l, j] = (z_l - z'_l)[last, j] * sum_k w_k * dF(z'_l + a_k (z_l - z'_l)) / dz_l[last, j]

with ``(a_k, w_k)`` from Captum's approximation methods. Two engines compute it:

``FastKVA`` (default) is exact and uses these shortcuts, none of which Captum offers for a
per-layer path (which is why this part is hand-written):

- the hidden state entering layer ``l+1`` of a scaled run is ``mid_l + z_scaled``, where
  ``mid_l = h_{l+1} - z_l`` is the clean residual after layer ``l``'s attention, so only
  layers ``l+1..L`` re-run and no parameter needs a gradient;
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

``CaptumKVA`` is the reference: one Captum attribution per layer (``LayerIntegratedGradients``
on ``down_proj`` for the ``token`` baseline, as the original code does;
``IntegratedGradients`` on the injected down_proj output for ``zero``).

``scale_positions="last"`` is an opt-in variant and a different quantity: only the last
position's ``z_l`` is scaled, so the earlier positions keep their clean keys/values and
each layer needs just ``m`` single-token passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from captum.attr._utils.approximation_methods import SUPPORTED_METHODS, approximation_parameters
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from loki_exp.errors import LokiError
from loki_exp.model_access import decoder_layers, down_projs

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
        if self.method not in SUPPORTED_METHODS:
            raise LokiError(f"kva.method={self.method!r} is not known; expected one of "
                            f"{SUPPORTED_METHODS}")
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
        step_sizes, alphas = approximation_parameters(self.method)
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


class FastKVA:
    """Exact KVA with the shortcuts in the module docstring."""

    # Layers whose scaled last tokens run as one batch (one call per decoder layer, one
    # lm_head call, one backward); bounds the keys/values held at once.
    STREAM_GROUP = 8

    def __init__(self, model: nn.Module, settings: KVASettings):
        self.model = model
        self.settings = settings
        self.decoder = model.get_decoder()
        self.layers = decoder_layers(model)
        self.projs = down_projs(model)
        self.lm_head = model.get_output_embeddings()
        alphas, weights = settings.quadrature()
        param = next(model.parameters())
        self.alphas = torch.tensor(alphas, dtype=param.dtype, device=param.device)
        self.weights = torch.tensor(weights, dtype=torch.float32, device=param.device)
        # Points at alpha = 1 are the clean run: their prefix keys/values come from it.
        self.clean_rows = [k for k, a in enumerate(alphas) if a == 1.0]
        self.run_rows = [k for k in range(len(alphas)) if k not in self.clean_rows]
        self.set_shared_prefix(None)

    # -- clean passes --------------------------------------------------------------------
    @torch.no_grad()
    def _clean(self, input_ids: torch.Tensor):
        """Each layer's output and down_proj output, the KV cache, the last logits."""
        with capture_outputs(self.projs) as z_out, capture_outputs(list(self.layers)) as layer_out:
            out = self.model(input_ids, use_cache=True)
        return layer_out, z_out, out.cache, out.logits[0, -1]

    @torch.no_grad()
    def _token_baseline(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        with capture_outputs(self.projs) as outputs:
            self.model(torch.full_like(input_ids, self.settings.baseline_token_id), use_cache=False)
        return outputs

    # -- running a range of layers -------------------------------------------------------
    def _masks(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
               start: int) -> dict[str, object]:
        config = self.model.config
        past = cache.layers[start].get_seq_length() if start < len(cache.layers) else 0
        kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=None,
                      cache=cache if past else None, position_ids=position_ids)
        if past:
            kwargs["layer_idx"] = start
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def _run_from(self, start: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                  cache: DynamicCache, use_mask: bool, kv_only: bool = False) -> torch.Tensor | None:
        """Run decoder layers ``start..L-1`` on ``hidden`` (positions ``position_ids``).

        ``kv_only``: the caller needs only the keys/values these positions leave in the
        cache, so the last layer runs its attention (which writes them) but not its MLP.
        """
        if start >= len(self.layers):
            return hidden
        pos_emb = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        # With a KV cache and a single query token every cached key is visible: no mask.
        masks = self._masks(hidden, position_ids, cache, start) if use_mask else {}
        types = getattr(self.model.config, "layer_types", None)
        last = len(self.layers) - 1
        for idx in range(start, len(self.layers)):
            mask = masks.get(types[idx] if types else "full_attention")
            block = self.layers[idx]
            if kv_only and idx == last:
                block.self_attn(hidden_states=block.input_layernorm(hidden), attention_mask=mask,
                                position_embeddings=pos_emb, position_ids=position_ids,
                                cache=cache, use_cache=True)
                return None
            hidden = block(hidden, attention_mask=mask, position_embeddings=pos_emb,
                           position_ids=position_ids, cache=cache, use_cache=True)
        return hidden

    def _prob_of_target(self, hidden_last: torch.Tensor, target: int) -> torch.Tensor:
        logits = self.lm_head(self.decoder.norm(hidden_last))[:, -1].float()
        return torch.softmax(logits, dim=-1)[:, target]

    # -- attribution ---------------------------------------------------------------------
    def attribute(self, input_ids: torch.Tensor) -> Attribution:
        """Attributions [L, D] for one prompt ``input_ids`` [1, S] (no padding)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("FastKVA.attribute takes one prompt of shape [1, S]")
        if self.alphas.device != input_ids.device:  # Lightning moved the model
            self.alphas = self.alphas.to(input_ids.device)
            self.weights = self.weights.to(input_ids.device)
        layer_out, z_clean, clean_cache, logits_last = self._clean(input_ids)
        target, prob = _target(logits_last)
        if self.settings.baseline == "zero":
            z_base = [torch.zeros_like(z) for z in z_clean]
        else:
            z_base = self._token_baseline(input_ids)
        # Clean residual after each layer's attention; a scaled z is added back onto it.
        mids = [out - z for out, z in zip(layer_out, z_clean)]
        deltas = [z - zb for z, zb in zip(z_clean, z_base)]  # [1, S, D] each
        if self.settings.scale_positions == "all":
            grads = self._grads_all_positions(input_ids, mids, z_base, deltas, clean_cache,
                                              target)
        else:
            grads = self._grads_last_position(input_ids.shape[1], mids, z_base, deltas,
                                              clean_cache, target)
        m = self.alphas.numel()
        scores = [d[0, -1].float() * (g[:, 0].float() * self.weights.view(m, 1)).sum(0)
                  for d, g in zip(deltas, grads)]
        return Attribution(torch.stack(scores), target, prob)

    def _grads_all_positions(self, input_ids, mids, z_base, deltas, clean_cache, target):
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
                cache = caches[layer] = DynamicCache(config=self.model.config)
                with torch.no_grad():
                    if shared:
                        for idx, (keys, values) in self._prefix_kv[layer].items():
                            cache.update(keys, values, idx)
                    if shared < seq - 1:
                        rows = slice(shared, seq - 1)
                        scaled = z_base[layer][:, rows] + alphas[self.run_rows] * deltas[layer][:, rows]
                        positions = torch.arange(shared, seq - 1, device=device).unsqueeze(0)
                        self._run_from(layer + 1, mids[layer][:, rows] + scaled, positions, cache,
                                       use_mask=True, kv_only=True)
                    if self.clean_rows:
                        self._insert_clean_rows(cache, clean_cache, layer + 1)

            def prefix_kv(layer: int, idx: int, caches=caches) -> tuple[torch.Tensor, torch.Tensor]:
                return caches[layer].layers[idx].keys, caches[layer].layers[idx].values

            grads += self._stream_last_tokens(group, prefix_kv, seq, mids, z_base, deltas, target)
        return grads

    def _stream_last_tokens(self, group, prefix_kv, seq, mids, z_base, deltas, target):
        """Scaled last tokens of the layers in ``group`` as one batch of streams.

        Stream (l, k) joins at layer l+1 with ``mid_l + z_l(a_k)`` at the last position and
        attends to its own prefix keys/values ``prefix_kv(l, j)``; layer j runs all streams
        that have joined in one call, and one lm_head call and one backward serve them all
        (their graphs are independent). Returns d prob / d z_l(a_k) per layer, [m, 1, D].
        """
        m = self.alphas.numel()
        alphas = self.alphas.view(m, 1, 1)
        n_layers = len(self.layers)
        last_pos = torch.tensor([[seq - 1]], device=mids[0].device)
        leaves = {layer: (z_base[layer][:, -1:] + alphas * deltas[layer][:, -1:]).detach()
                  .requires_grad_(True) for layer in group}
        cache = DynamicCache(config=self.model.config)
        with torch.enable_grad():
            active, joined = None, []
            for j in range(group[0] + 1, n_layers + 1):
                if j - 1 in leaves:
                    stream = mids[j - 1][:, -1:] + leaves[j - 1]
                    active = stream if active is None else torch.cat([active, stream])
                    joined.append(j - 1)
                if j == n_layers:
                    break
                if seq > 1:
                    keys, values = zip(*(prefix_kv(layer, j) for layer in joined))
                    cache.update(torch.cat(keys), torch.cat(values), j)
                pos_emb = self.decoder.rotary_emb(active, position_ids=last_pos)
                active = self.layers[j](active, attention_mask=None, position_embeddings=pos_emb,
                                        position_ids=last_pos, cache=cache, use_cache=True)
            probs = self._prob_of_target(active, target)  # [len(group) * m], stream order
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
        layer_out, z_clean, _, _ = self._clean(prefix)
        z_base = ([torch.zeros_like(z) for z in z_clean] if self.settings.baseline == "zero"
                  else self._token_baseline(prefix))
        m = self.alphas.numel()
        alphas = self.alphas.view(m, 1, 1)[self.run_rows]
        positions = torch.arange(prefix.shape[1], device=prefix.device).unsqueeze(0)
        out = []
        for layer in range(len(self.layers) - 1):
            cache = DynamicCache(config=self.model.config)
            scaled = z_base[layer] + alphas * (z_clean[layer] - z_base[layer])
            self._run_from(layer + 1, layer_out[layer] - z_clean[layer] + scaled, positions, cache,
                           use_mask=True, kv_only=True)
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

    def _grads_last_position(self, seq, mids, z_base, deltas, clean_cache, target):
        """Only the last position is scaled: every stream attends to the clean prefix."""
        m = self.alphas.numel()

        def prefix_kv(layer: int, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
            clean = clean_cache.layers[idx]
            return (clean.keys[:, :, :-1].expand(m, -1, -1, -1),
                    clean.values[:, :, :-1].expand(m, -1, -1, -1))

        n_layers = len(self.layers)
        grads: list[torch.Tensor] = []
        for start in range(0, n_layers, self.STREAM_GROUP):
            group = list(range(start, min(start + self.STREAM_GROUP, n_layers)))
            grads += self._stream_last_tokens(group, prefix_kv, seq, mids, z_base, deltas, target)
        return grads

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
        return torch.softmax(self.model(input_ids, use_cache=False).logits[:, -1].float(), dim=-1)

    def attribute(self, input_ids: torch.Tensor) -> Attribution:
        from captum.attr import IntegratedGradients, LayerIntegratedGradients

        s = self.settings
        with torch.no_grad(), capture_outputs(self.projs) as outputs:
            target, prob = _target(self.model(input_ids, use_cache=False).logits[0, -1])
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
