"""LoKI: train only the selected down_proj rows (``implant/loki_linear.LoKILinear``), in
fp32 master copies; LoKI*: low-rank factors on those rows (README "Methods")."""

from __future__ import annotations

from dataclasses import dataclass

from loki_exp.config_fields import spec
from loki_exp.implant.methods.base import Method, MethodSettings


@dataclass
class LokiLoraSettings(MethodSettings):
    rank: int = spec(16, ge=1)
    alpha: float = spec(32, gt=0.0)


def _prepare(cfg, model, positions, context, rank: int = 0, alpha=None):
    from loki_exp.implant.loki_linear import apply_loki

    return apply_loki(model, positions, lora_rank=rank, lora_alpha=alpha)


def _prepare_lora(cfg, model, positions, context):
    return _prepare(cfg, model, positions, context, rank=cfg.rank, alpha=cfg.alpha)


def _merge(model):
    from loki_exp.implant.loki_linear import merge_loki

    return merge_loki(model)


LOKI = Method("loki", MethodSettings, _prepare, _merge,
              "the selected down_proj rows (KVA, layer-balanced)",
              selects_rows=True, rows_adapter=True, quota_scales_lr=True)
# The quota does not set the rate of low-rank factors, and the paper ran LoKI* at one quota.
LOKI_LORA = Method("loki_lora", LokiLoraSettings, _prepare_lora, _merge,
                   "low-rank factors on the selected down_proj rows (LoKI*)",
                   selects_rows=True, rows_adapter=True)
