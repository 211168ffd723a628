"""What both KVA engines read off a model's forward: each module's outputs (hooks) and the
attribution's target, the model's own argmax next token."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


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


def target_of(logits_last: torch.Tensor) -> tuple[int, float]:
    probs = torch.softmax(logits_last.float(), dim=-1)
    token = int(probs.argmax())
    return token, float(probs[token])
