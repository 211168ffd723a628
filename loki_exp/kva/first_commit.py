"""The original repository's first-commit KVA, re-implemented as a reference (docs/method.md).

That code made the published position files; ``kva=published`` is the same quantity computed
by ``FastKVA``. This re-implementation does the work the way that code did, so tests can check
the fast engine against it and ``benchmarks/kva_speed.py`` can time it: for each layer, hook
``down_proj`` on a batch of ``m`` full-length copies of the prompt, replace the last
position of copy k with k/m * z (z: that layer's clean output there), take the gradient of
the target token's probability at the last position w.r.t. the replaced activations, and sum:
``attr = z / m * sum_k grad_k`` (left Riemann sum, zero baseline).
"""

from __future__ import annotations

import torch
from torch import nn

from loki_exp.model_access import down_projs


def first_commit_kva(model: nn.Module, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """Attributions [L, D] (float32) and the target token for one prompt ``ids`` [1, S]."""
    projs = down_projs(model)
    clean: list[torch.Tensor] = []
    with torch.no_grad():
        hooks = [p.register_forward_hook(lambda m, i, o: clean.append(o[0, -1].clone()))
                 for p in projs]
        try:
            target = int(model(ids).logits[0, -1].argmax())
        finally:
            for h in hooks:
                h.remove()
    rows = []
    for proj, z in zip(projs, clean):
        scaled = torch.stack([z * k / steps for k in range(steps)]).requires_grad_(True)

        def replace(module, args, out, scaled=scaled):
            out = out.clone()
            out[:, -1] = scaled
            return out

        handle = proj.register_forward_hook(replace)
        try:
            with torch.enable_grad():
                logits = model(ids.expand(steps, -1)).logits[:, -1]
                prob = torch.softmax(logits.float(), dim=-1)[:, target]
                (grad,) = torch.autograd.grad(prob.sum(), scaled)
        finally:
            handle.remove()
        rows.append(z.float() / steps * grad.float().sum(0))
    return torch.stack(rows).detach(), target
