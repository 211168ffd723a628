"""The export stage: fold the trained changes in and save a standard HF checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from loki_exp.atomic import writing_dir
from loki_exp.implant import methods
from loki_exp.models import LoadedModel

if TYPE_CHECKING:
    from loki_exp.config_schema import RunConfig


def export_checkpoint(cfg: RunConfig, loaded: LoadedModel, output_dir: Path) -> Path:
    """Write ``<output_dir>/model`` (safetensors, config, tokenizer); plain transformers loads it."""
    model = methods.merge(cfg.method, loaded.model)
    loaded.model = model
    target = output_dir / "model"
    with writing_dir(target) as tmp:  # the new folder in place before the old one goes
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    return target
