"""OmegaConf resolvers the configs use; registered when ``loki_exp`` is imported."""

from __future__ import annotations

import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from loki_exp.errors import LokiError


def _mul(*factors):
    """``${mul:4,${parallelism.devices},${parallelism.num_nodes}}``: a per-device batch as the
    global batch (the paper experiments' LlamaFactory per_device_train_batch_size); also
    ``${mul:1.0e-3,${vars.lr_mult}}``, a swept multiple of a base learning rate."""
    if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in factors):
        raise LokiError(f"${{mul:...}} needs numbers, got {list(factors)} (parallelism.devices "
                        "must be a number here, not 'auto')")
    return math.prod(factors)


# oneDNN ISA caps without bf16 instructions: ONEDNN_MAX_CPU_ISA=AVX2 (with
# ATEN_CPU_CAPABILITY=avx2) runs a newer CPU as an AVX2-only one, so it counts as one here too.
NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                "AVX512_CORE_VNNI")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 in hardware (Linux /proc/cpuinfo flags),
    unless oneDNN is capped below them."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in NO_BF16_ISAS:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_precision() -> str:
    """``${cpu_precision:}``: bf16 autocast where the CPU has bf16 hardware, else fp32. Without
    it bf16 matmuls are emulated: 56x slower than fp32 on an AVX2-only EPYC (measured), which
    turns a minutes-long CPU run into hours. The resolved value is in the run's config."""
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def register() -> None:
    for name, fn in (("mul", _mul), ("cpu_precision", _cpu_precision)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
