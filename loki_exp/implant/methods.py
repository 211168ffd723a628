"""What each `method` trains, and how its result becomes a plain HF model again.

``loki`` / ``loki_lora``: the selected down_proj rows (``LoKILinear``). ``lora`` / ``dora``
/ ``pissa``: peft adapters on all linear layers, merged on export. ``full``: everything.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from loki_exp.errors import LokiError
from loki_exp.implant.loki_linear import apply_loki, merge_loki

METHODS = ("loki", "loki_lora", "lora", "dora", "pissa", "full")
LOKI_METHODS = ("loki", "loki_lora")


def check_method(cfg: DictConfig) -> None:
    if cfg.name not in METHODS:
        raise LokiError(f"method={cfg.name!r} is not known; expected one of {list(METHODS)}")


def prepare(cfg: DictConfig, model: nn.Module, positions: list[list[int]] | None) -> nn.Module:
    """Return the model with exactly this method's parameters trainable."""
    check_method(cfg)
    if cfg.name in LOKI_METHODS:
        if positions is None:
            raise LokiError(f"method={cfg.name} needs positions (run the select stage)")
        rank = int(cfg.rank) if cfg.name == "loki_lora" else 0
        return apply_loki(model, positions, lora_rank=rank, lora_alpha=cfg.get("alpha"))
    if cfg.name == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=int(cfg.rank), lora_alpha=float(cfg.alpha), lora_dropout=0.0,
        target_modules=cfg.target_modules if isinstance(cfg.target_modules, str)
        else list(cfg.target_modules),
        use_dora=cfg.name == "dora",
        init_lora_weights="pissa" if cfg.name == "pissa" else True,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def export(cfg: DictConfig, model: nn.Module) -> nn.Module:
    """A plain transformers model with the trained changes folded in."""
    if cfg.name in LOKI_METHODS:
        return merge_loki(model)
    if cfg.name == "full":
        return model
    return model.merge_and_unload()
