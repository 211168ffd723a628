"""Achieved FLOP/s against this machine's own matmul peak, measured in the same process.

FLOPs are counted by torch's ``FlopCounterMode`` over one call (matmuls and attention, forward
and backward as executed). Its table has no formula for the CPU's flash attention kernels, so
they are added here with torch's own SDPA formulas, halved for a causal call (the kernel skips
the masked half). The peak is the best FLOP/s of ``torch.matmul`` on the model's own shapes in
the same dtype and thread count, timed here: what this machine reaches on this work, not a
datasheet number.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _causal_share(args: tuple, kwargs: dict, position: int) -> float:
    causal = kwargs.get("is_causal", args[position] if len(args) > position else False)
    return 0.5 if causal else 1.0


def _cpu_flash(query, key, value, *args, out_val=None, **kwargs) -> int:
    return int(sdpa_flop_count(query, key, value) * _causal_share(args, kwargs, 1))


def _cpu_flash_backward(grad_out, query, key, value, out, logsumexp, *args, out_val=None,
                        **kwargs) -> int:
    return int(sdpa_backward_flop_count(grad_out, query, key, value)
               * _causal_share(args, kwargs, 1))


CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks fail under
    ``torch.autograd.grad`` with leaf inputs (Captum's integrated gradients do that): only the
    global total is read here."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(shapes: list[tuple[int, int, int]], dtype: torch.dtype,
                device: str | torch.device = "cpu", repeats: int = 5) -> float:
    """Best FLOP/s of ``[m, k] @ [k, n]`` over ``shapes`` in ``dtype``."""
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        for _ in range(2):  # warm-up: kernels chosen, caches filled
            a @ b
        times = []
        for _ in range(repeats):
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best = max(best, 2 * m * k * n / min(times))
    return best


def linear_shapes(model: torch.nn.Module, tokens: int) -> list[tuple[int, int, int]]:
    """``(tokens, in, out)`` of every distinct Linear shape in the model (lm_head included)."""
    shapes = {(tokens, m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, torch.nn.Linear)}
    return sorted(shapes)
