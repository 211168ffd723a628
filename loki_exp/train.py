"""Entry point: ``python -m loki_exp.train [overrides]`` runs one LoKI study job.

Compose the config (Hydra), run the stages (``loki_exp.pipeline``), return the metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from loki_exp.cli import report_user_errors
from loki_exp.config_check import check_config
from loki_exp.pipeline import run
from loki_exp.sweep_job import ran_in_own_process

log = logging.getLogger("loki_exp.train")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@report_user_errors
def main(cfg: DictConfig) -> dict:
    config = check_config(cfg)  # before a multirun job launches its own processes
    if ran_in_own_process(config, "loki_exp.train"):  # a DDP job of a --multirun
        return {}
    state = run(config, Path(config.paths.output_dir))
    return state.metrics or {}


if __name__ == "__main__":
    main()
