"""The export stage: fold the trained changes in and save a standard HF checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig

from loki_exp.implant import methods
from loki_exp.models import LoadedModel


def export_checkpoint(cfg: DictConfig, loaded: LoadedModel, output_dir: Path) -> Path:
    """Write ``<output_dir>/model`` (safetensors, config, tokenizer); plain transformers loads it."""
    model = methods.export(cfg.method, loaded.model)
    loaded.model = model
    target = output_dir / "model"
    tmp = output_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export
    model.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
