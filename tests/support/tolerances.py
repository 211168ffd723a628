"""The tolerance for a float32 value computed along two paths (README "Tests").

Two paths that compute the same value in float32 (a left-padded batch against one prompt, a
merged weight against base + adapter, a cached prefix against a full pass, the engine against a
reference) run different kernels: their sums round differently, and on AVX-512 CPUs torch's
vectorised exp is an approximation of up to ~20 ulp. ``benchmarks/fp32_path_error.py`` measures
it on the tiny models (a left-padded batch against one prompt at a time, each against float64):
on an AVX-512 EPYC, batch vs one prompt up to 126.7 float32 eps (1.5e-5 of the largest value),
either path vs float64 up to 122.9; with the AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``) 9.3 and 24.8. 1e-4 of the compared values' scale (~840 eps) leaves
6x room over the worst seen, is the budget the KVA engine's own
self-check holds its float32 path to (``FastKVA.CHECK_TOLERANCE``), and stays far below what
these tests exist to catch: an attended pad token, a row not merged, a wrong baseline move
values by 1e-2 of their scale and more.
"""

from __future__ import annotations

import torch

CROSS_PATH_FP32 = 1e-4


def assert_close_fp32(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """``got`` equals ``want`` within ``CROSS_PATH_FP32`` of ``want``'s largest magnitude."""
    scale = float(want.abs().max())
    diff = float((got.float() - want.float()).abs().max())
    assert scale > 0 and diff <= CROSS_PATH_FP32 * scale, \
        f"{what}: max difference {diff:.3g} > {CROSS_PATH_FP32:g} x scale {scale:.3g}"

# A float64 computation with a few float32 steps inside it (Gemma's norms compute in float32
# even in a float64 model, the loss's cross-entropy runs in float32, LoKI's fp32 master rows
# round their gradients to float32): each step rounds to float32's eps, 1.2e-7, and the values
# compared pass through a handful of them (measured: 2e-9 for Gemma's norms, 1 ulp for the
# rows' gradients). 1e-6 is about 8 eps; an attended pad or a wrong position moves them by 1e-2.
FLOAT32_STEPS = 1e-6
