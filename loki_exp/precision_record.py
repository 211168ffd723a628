"""Which precision each stage ran in, and why: timings from machines with and without bf16
hardware are then never compared blindly (run.json ``precision``, the run summary)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from loki_exp.resolvers import cpu_has_native_bf16

if TYPE_CHECKING:
    from loki_exp.config_schema import RunConfig

PICKED_FOR_THE_CPU = "${cpu_precision:}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def stage_precisions(cfg: RunConfig, kva_dtype: str | None = None,
                     eval_dtype: str | None = None) -> dict[str, Any]:
    """``{"cpu": ..., "cpu_bf16_hardware": bool, "<stage>": "<precision> (<why>)"}`` for the
    stages this run has; ``kva_dtype`` / ``eval_dtype``: what the analyse stage computed in
    and the dtype of the model the evaluate stage scored, when they ran."""
    hardware = cpu_has_native_bf16()
    # What was written, not what it resolved to: ${cpu_precision:} means the CPU picked it.
    raw = (OmegaConf.to_container(cfg.composed.trainer, resolve=False).get("precision")
           if cfg.composed is not None else None)
    if raw == PICKED_FOR_THE_CPU:
        why = ("picked for this CPU: bf16 hardware (AVX512-BF16 or AMX) found" if hardware
               else "picked for this CPU: no bf16 hardware, so fp32")
    else:
        why = "as configured"
    record: dict[str, Any] = {"cpu": cpu_name(), "cpu_bf16_hardware": hardware}
    stages = set(cfg.stages)
    if "analyse" in stages and kva_dtype:
        record["analyse"] = f"{kva_dtype} (kva.dtype, or the model's own when null)"
    if "implant" in stages:
        record["implant"] = f"{cfg.trainer.precision} ({why})"
    if "evaluate" in stages and eval_dtype:
        record["evaluate"] = f"{eval_dtype} (the scored model's dtype, no autocast)"
    return record


def precision_line(record: dict[str, Any]) -> str:
    stages = "; ".join(f"{k} {v}" for k, v in record.items() if k not in ("cpu", "cpu_bf16_hardware"))
    hardware = "bf16 hardware" if record["cpu_bf16_hardware"] else "no bf16 hardware"
    return f"Precision: {stages}. CPU: {record['cpu']} ({hardware})."
