"""Loggers of a run: CSV always, W&B when configured (offline by default)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(output_dir, name="csv", version="")]
    wb = cfg.logger.get("wandb")
    if wb:
        os.environ.setdefault("WANDB_MODE", str(wb.mode))
        config = OmegaConf.to_container(cfg, resolve=True)
        # One group per sweep (the multirun dir), one run per job, named by its choices.
        group = wb.get("group") or Path(output_dir).parent.name
        name = f"{cfg.method.name}-{cfg.strategy.name}-q{cfg.quota}"
        loggers.append(WandbLogger(project=str(wb.project), group=group, name=name,
                                   save_dir=str(output_dir), config=config))
    return loggers


def log_final_metrics(loggers: list[Logger], metrics: dict[str, float]) -> None:
    for lg in loggers:
        lg.log_metrics(metrics)
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update(metrics)
        lg.save()


def close_loggers(loggers: list[Logger], status: str) -> None:
    for lg in loggers:
        lg.finalize(status)
        if isinstance(lg, WandbLogger):
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)
