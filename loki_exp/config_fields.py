"""Field helpers of the configuration schema, shared by ``config_schema`` and the settings
classes that live with their code (``implant/methods``): a field's default and its allowed
values, kept as dataclass metadata that the checker walks (``config_walk``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import field
from typing import Any

from omegaconf import MISSING


def spec(default: Any = MISSING, *, choices: tuple | Callable[[], Any] | None = None,
         ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A field with its allowed values; ``choices`` may be a callable (read when checked)."""
    meta = {k: v for k, v in dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt).items()
            if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def choices_from(module: str, name: str) -> Callable[[], tuple]:
    """Choices read from the module that owns them, when checked (importing that module when
    the schema loads would import a stage, and most stages import torch)."""
    def read() -> tuple:
        return tuple(getattr(importlib.import_module(module), name))
    return read
