"""The fast engine's last-position definition (``scale_positions=last``, the published
preset): only the last position is scaled, so every stream of a prompt attends to the same
clean prefix and a batch of left-padded prompts runs together. A mixin of ``FastKVA``."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from loki_exp.kva.settings import Attribution


class LastPosition:
    def _attribute_last(self, prompts: list[torch.Tensor], record,
                        layers: list[int]) -> list[Attribution]:
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
        m = self.alphas.numel()
        # Each layer's visible clean prefix, once for all groups of layers: keys and values
        # [B, H, P, d] and which of them are real tokens [B, 1, P, 1]. Left padding's
        # keys/values are zeroed so nothing undefined meets a zero attention weight.
        prefixes = []
        for j, kv in enumerate(clean.cache.layers):
            seen = view.visible_prefix(j, keep[:, None, :-1, None])
            prefixes.append((view.visible_prefix(j, kv.keys[:, :, :-1]) * seen,
                             view.visible_prefix(j, kv.values[:, :, :-1]) * seen, seen[:, 0, :, 0]))
        grads: list[torch.Tensor] = []
        for group in self._groups(layers):
            grads += self._last_position_streams(group, mids, z_base, deltas, prefixes,
                                                 clean.tables, positions, targets, record)
        out = []
        for row in range(batch):
            scores = [deltas[layer][row, 0].float() * (g[row].float() * self.weights.view(m, 1)).sum(0)
                      for layer, g in zip(layers, grads)]
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
