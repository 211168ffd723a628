"""The fast engine's all-positions definition (``scale_positions=all``): every position of
layer l's down_proj output is scaled, so a scaled prefix re-runs layers l+1..L once, without
autograd, for its keys/values; the template prefix shared by every probe prompt is computed
once; the scaled last tokens of a group of layers then run as one batch of streams
(``kva/engine.py``'s docstring lists the shortcuts). A mixin of ``FastKVA``: it uses the
engine's clean pass, layer runner and quadrature."""

from __future__ import annotations

import torch
from transformers import DynamicCache


class AllPositions:
    def _grads_all_positions(self, input_ids, mids, z_base, deltas, clean, target, record,
                             layers):
        """Per layer l of ``layers``: the scaled prefix once without autograd, for the
        keys/values it leaves in layers l+1..L (points at alpha = 1 are the clean run: their
        keys/values come from the clean cache). Then the last tokens of a group of layers run
        together."""
        seq = input_ids.shape[1]
        device = input_ids.device
        m = self.alphas.numel()
        alphas = self.alphas.view(m, 1, 1)
        shared = self._shared_prefix_len(input_ids)
        n_layers = len(self.layers)
        grads: list[torch.Tensor] = []
        for group in self._groups(layers):
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
        """Scaled last tokens of the layers in ``group`` (sorted) as one batch of streams.

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
