"""Loggers of a run: the ``logger`` group's CSV and W&B loggers and any others (``extra``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger

if TYPE_CHECKING:
    from loki_exp.config_schema import RunConfig


def sweep_group(output_dir: str | os.PathLike) -> str:
    """``<date>_<time>`` of ``multirun/<date>/<time>/<job>``; a single run's own dir name
    under its date (``outputs/<date>/<time>``) otherwise."""
    out = Path(output_dir)
    if out.name.isdigit():  # a multirun job number
        out = out.parent
    return f"{out.parent.name}_{out.name}"


def build_loggers(cfg: RunConfig, output_dir: Path) -> list[Logger]:
    """The ``logger`` group's loggers, each built with ``hydra.utils.instantiate``; the run
    dir is their ``save_dir`` unless a spec sets one."""
    lg, loggers = cfg.logger, []
    here = {"save_dir": str(output_dir)}
    if lg.csv:
        loggers.append(_build(lg.csv, _unless_set(lg.csv, here)))
    if lg.wandb:
        wb = lg.wandb
        ours = {
            # WANDB_MODE (e.g. disabled in tests) wins over the config; passed to wandb.init
            # itself, since W&B reads its environment only once per process.
            "mode": os.environ.get("WANDB_MODE") or wb.get("mode"),
            # One group per sweep: the multirun dir's date and time (the time alone would
            # join sweeps started at the same time on different days).
            "group": wb.get("group") or sweep_group(output_dir),
            "config": cfg.record(),
            "name": wb.get("name") or f"{cfg.method.name}-{cfg.strategy.name}-q{cfg.quota:g}",
            # A spec may name it as WandbLogger does or as wandb.init does (WandbLogger's own
            # default, ".", would win over a dir).
            "save_dir": wb.get("save_dir") or wb.get("dir") or str(output_dir)}
        loggers.append(_build(wb, {k: v for k, v in ours.items() if v is not None}))
    for spec in lg.extra or []:
        loggers.append(_build(spec, _unless_set(spec, here)))
    return loggers


def _build(spec: dict[str, Any], ours: dict) -> Logger:
    # partial: the spec's arguments through Hydra (as plain lists and dicts: wandb.init
    # ignores a settings that is not a dict), ours (the run's config, paths) passed as they
    # are, never copied into a config; ours win where both set one (mode, group, name).
    return instantiate(spec, _partial_=True, _convert_="all")(**ours)


def _unless_set(spec: dict[str, Any], defaults: dict) -> dict:
    return {k: v for k, v in defaults.items() if spec.get(k) is None}


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
