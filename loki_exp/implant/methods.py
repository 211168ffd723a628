"""What each `method` trains, and how its result becomes a plain HF model again.

``loki`` / ``loki_lora``: the selected down_proj rows (``LoKILinear``). ``lora`` / ``dora``
/ ``pissa`` / ``corda``: peft adapters on all linear layers, merged on export (``corda``: the
CorDA-KPM init, see ``implant/corda.py``). ``full``: everything.
``suppress`` (the paper's S-H / S-L ablation): no training; the selected rows are zeroed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

from loki_exp.config_schema import check_section
from loki_exp.errors import LokiError
from loki_exp.implant.loki_linear import apply_loki, merge_loki
from loki_exp.model_access import down_projs

if TYPE_CHECKING:
    from loki_exp.models import LoadedModel

METHODS = ("loki", "loki_lora", "lora", "dora", "pissa", "corda", "full", "suppress")
LOKI_METHODS = ("loki", "loki_lora")
SELECTING_METHODS = (*LOKI_METHODS, "suppress")  # methods that need KVA + selected rows
TRAINING_METHODS = tuple(m for m in METHODS if m != "suppress")


def prepare(cfg: DictConfig, model: nn.Module, positions: list[list[int]] | None, *,
            loaded: LoadedModel | None = None, cache_dir: Any = None,
            like: nn.Module | None = None) -> nn.Module:
    """Return the model with exactly this method's parameters trainable.

    ``corda`` alone uses the keywords: ``loaded`` (tokenizer, fingerprint, name of ``model``)
    and ``cache_dir`` to find or compute its cached init, or ``like``, a model it already
    prepared, whose init it repeats (the FSDP export's fresh copy).
    """
    check_section("method", cfg)  # before any weight is touched (also for library callers)
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
    if cfg.name == "corda":
        from loki_exp.implant.corda import prepare_corda

        return prepare_corda(cfg, model, loaded, cache_dir, like=like)
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
