"""What a method is: its settings and the two things it does to a model.

A method (peft's "tuner") is one ``Method`` in the registry (``implant/methods/__init__``):
its settings dataclass (the keys of the ``method`` group, checked by ``config_check``),
``prepare`` (make exactly its parameters trainable, or apply its edit) and ``merge`` (fold
its result back into a plain transformers model), and what the pipeline needs to know about
it. Nothing outside the registry compares method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from loki_exp.config_fields import choices_from, spec

if TYPE_CHECKING:
    from torch import nn

    from loki_exp.models import LoadedModel


@dataclass
class MethodSettings:
    """The keys every method has."""

    name: str = spec(MISSING, choices=choices_from("loki_exp.implant.methods", "METHOD_NAMES"))
    lr: float = spec(MISSING, gt=0.0)


@dataclass
class PrepareContext:
    """What a method's ``prepare`` may need besides the model and the rows. ``loaded``: the
    model's tokenizer, fingerprint and name; ``cache_dir``: where cached inits live; ``like``:
    a model this method already prepared, whose init a fresh copy repeats (FSDP's export)."""

    loaded: LoadedModel | None = None
    cache_dir: Any = None
    like: nn.Module | None = None


@dataclass(frozen=True)
class Method:
    name: str
    settings: type[MethodSettings]
    # (settings as the config's ``method`` group, model, selected rows or None, context) -> model
    prepare: Callable[[Any, nn.Module, list[list[int]] | None, PrepareContext], nn.Module]
    # the prepared (and trained) model -> a plain transformers model
    merge: Callable[[nn.Module], nn.Module]
    summary: str
    selects_rows: bool = False  # needs KVA-selected rows: the analyse and select stages run
    trains: bool = True         # False: an edit applied once, no training (suppress)
    rows_adapter: bool = False  # its change is the selected rows: saved as a rows adapter
    quota_scales_lr: bool = False  # an experiment's ``quota_lr_scale`` applies to its rate
    # ``prepare`` keeps the base model's function (an adapter that starts at zero, rows split
    # off unchanged, a residual plus its factors): a curve's step-0 point is then the base's
    # own scores, not measured again (``evaluation/curves.py``)
    starts_at_base: bool = True


def unchanged(model: nn.Module) -> nn.Module:
    """``merge`` of a method that changes the model's own weights in place."""
    return model
