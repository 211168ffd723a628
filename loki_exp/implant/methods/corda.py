"""CorDA (knowledge-preserved mode by default): LoRA initialised from the covariance of the
base model's activations on general questions (``implant/corda.py``), merged on export."""

from __future__ import annotations

from dataclasses import dataclass, field

from loki_exp.config_fields import choices_from, spec
from loki_exp.implant.methods.base import Method
from loki_exp.implant.methods.lora import PeftLoraSettings, merge_peft


@dataclass
class Covariance:
    source: str = spec("naturalqs_open", choices=choices_from("loki_exp.implant.corda", "SOURCES"))
    samples: int = spec(256, ge=1)
    max_length: int = spec(512, ge=1)


@dataclass
class CordaSettings(PeftLoraSettings):
    corda_method: str = spec("kpm", choices=choices_from("loki_exp.implant.corda", "CORDA_METHODS"))
    covariance: Covariance = field(default_factory=Covariance)


def _prepare(cfg, model, positions, context):
    from loki_exp.implant.corda import prepare_corda

    return prepare_corda(cfg, model, context.loaded, context.cache_dir, like=context.like)


CORDA = Method("corda", CordaSettings, _prepare, merge_peft,
               "peft LoRA with the CorDA init (knowledge-preserved) on all linear layers")
