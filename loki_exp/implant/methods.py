"""What each `method` trains, and how its result becomes a plain HF model again.

``loki`` / ``loki_lora``: the selected down_proj rows (``LoKILinear``). ``lora`` / ``dora``
/ ``pissa``: peft adapters on all linear layers, merged on export. ``full``: everything.
``suppress`` (the paper's S-H / S-L ablation): no training; the selected rows are zeroed.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from loki_exp.errors import LokiError, check_positive_int
from loki_exp.implant.loki_linear import apply_loki, merge_loki
from loki_exp.model_access import down_projs

METHODS = ("loki", "loki_lora", "lora", "dora", "pissa", "full", "suppress")
LOKI_METHODS = ("loki", "loki_lora")
SELECTING_METHODS = (*LOKI_METHODS, "suppress")  # methods that need KVA + selected rows
TRAINING_METHODS = tuple(m for m in METHODS if m != "suppress")


def check_method_name(cfg: DictConfig) -> None:
    if cfg.name not in METHODS:
        raise LokiError(f"method={cfg.name!r} is not known; expected one of {list(METHODS)}")


def check_method(cfg: DictConfig) -> None:
    """The whole method group, as a run uses it (validated before any stage)."""
    check_method_name(cfg)
    if cfg.name in TRAINING_METHODS and not _positive(cfg.get("lr")):
        raise LokiError(f"method.lr={cfg.get('lr')!r} must be a positive number")
    if cfg.name in ("loki_lora", "lora", "dora", "pissa"):
        check_positive_int("method.rank", cfg.get("rank"), f" for method={cfg.name}")


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def prepare(cfg: DictConfig, model: nn.Module, positions: list[list[int]] | None) -> nn.Module:
    """Return the model with exactly this method's parameters trainable."""
    check_method_name(cfg)
    if cfg.name in SELECTING_METHODS and positions is None:
        raise LokiError(f"method={cfg.name} needs positions (run the select stage)")
    if cfg.name == "suppress":
        return suppress_rows(model, positions)
    if cfg.name in LOKI_METHODS:
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


@torch.no_grad()
def suppress_rows(model: nn.Module, positions: list[list[int]]) -> nn.Module:
    """Zero the selected down_proj rows (and their bias entries); nothing trains."""
    model.requires_grad_(False)
    for proj, rows in zip(down_projs(model), positions):
        if rows:
            index = torch.tensor(rows, device=proj.weight.device)
            proj.weight.index_fill_(0, index, 0.0)
            if proj.bias is not None:
                proj.bias.index_fill_(0, index, 0.0)
    return model


def export(cfg: DictConfig, model: nn.Module) -> nn.Module:
    """A plain transformers model with the trained changes folded in."""
    if cfg.name in LOKI_METHODS:
        return merge_loki(model)
    if cfg.name in ("full", "suppress"):
        return model
    return model.merge_and_unload()
