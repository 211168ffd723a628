"""peft's LoRA family on all linear layers: LoRA, DoRA and PiSSA, merged on export."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loki_exp.implant.methods.base import Method
from loki_exp.implant.methods.loki import LokiLoraSettings


@dataclass
class PeftLoraSettings(LokiLoraSettings):
    target_modules: Any = "all-linear"  # peft's: "all-linear" or a list of module names


def peft_config(cfg, **overrides):
    from peft import LoraConfig

    kw = dict(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
              target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    return LoraConfig(**{**kw, **overrides})


def _preparer(**overrides):
    def prepare(cfg, model, positions, context):
        from peft import get_peft_model

        return get_peft_model(model, peft_config(cfg, **overrides))
    return prepare


def merge_peft(model):
    return model.merge_and_unload()


LORA = Method("lora", PeftLoraSettings, _preparer(), merge_peft, "peft LoRA on all linear layers")
DORA = Method("dora", PeftLoraSettings, _preparer(use_dora=True), merge_peft,
              "peft DoRA on all linear layers")
PISSA = Method("pissa", PeftLoraSettings, _preparer(init_lora_weights="pissa"), merge_peft,
               "peft PiSSA (LoRA from the principal singular vectors) on all linear layers")
