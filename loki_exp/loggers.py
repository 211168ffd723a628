"""Loggers of a run: CSV always, W&B when configured (offline by default)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf


def sweep_group(output_dir: str | os.PathLike) -> str:
    """``<date>_<time>`` of ``multirun/<date>/<time>/<job>``; a single run's own dir name
    under its date (``outputs/<date>/<time>``) otherwise."""
    out = Path(output_dir)
    if out.name.isdigit():  # a multirun job number
        out = out.parent
    return f"{out.parent.name}_{out.name}"


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    # csv/metrics.csv: the training curve next to the run (logger.csv=false leaves it out)
    loggers: list[Logger] = [CSVLogger(output_dir, name="csv", version="")] \
        if cfg.logger.get("csv", True) else []
    wb = cfg.logger.get("wandb")
    if wb:
        # WANDB_MODE (e.g. disabled in tests) wins over the config; passed to wandb.init
        # itself, since W&B reads its environment only once per process.
        mode = os.environ.get("WANDB_MODE") or str(wb.mode)
        config = OmegaConf.to_container(cfg, resolve=True)
        # One group per sweep, one run per job, named by its choices. The group is the
        # multirun dir's date and time (multirun/<date>/<time>/<job>): the time alone would
        # join sweeps started at the same time on different days.
        group = wb.get("group") or sweep_group(output_dir)
        name = f"{cfg.method.name}-{cfg.strategy.name}-q{cfg.quota}"
        loggers.append(WandbLogger(project=str(wb.project), group=group, name=name,
                                   save_dir=str(output_dir), config=config, mode=mode))
    for spec in cfg.logger.get("extra") or []:
        loggers.append(instantiate(spec, **({} if "save_dir" in spec else
                                            {"save_dir": str(output_dir)})))
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
