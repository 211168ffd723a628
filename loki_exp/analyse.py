"""``python -m loki_exp.analyse [overrides]``: run only the KVA stage and print the store path.

Takes the same config as ``loki_exp.train``; the store is shared with every training run
of the same model, probe data and KVA settings.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from loki_exp.cli import report_user_errors
from loki_exp.config_check import check_config
from loki_exp.kva.stage import run_analyse
from loki_exp.models import load_model
from loki_exp.parallel import is_global_zero
from loki_exp.sweep_job import ran_in_own_process


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@report_user_errors
def main(cfg: DictConfig) -> str:
    config = check_config(cfg, groups=("paths", "model", "kva", "parallelism"))
    if ran_in_own_process(config, "loki_exp.analyse"):  # a DDP job of a --multirun
        return ""
    path = run_analyse(config, load_model(config.model, config.paths.cache_dir))
    if is_global_zero():  # under DDP every rank runs this; print the path once
        # One write with its newline: unbuffered stdout (PYTHONUNBUFFERED=1) would otherwise
        # send path and newline separately, and another rank's log line can land between them.
        sys.stdout.write(f"{path}\n")
        sys.stdout.flush()
    return str(path)


if __name__ == "__main__":
    main()
