"""Jobs of a Hydra ``--multirun`` that use several processes (DDP / FSDP).

Lightning's DDP launcher starts the other ranks by re-running the script with the same
command line; inside a ``--multirun`` that command is the whole sweep, so every rank would
run every job again (duplicate run dirs, jobs out of step). Instead such a job re-runs
itself as one plain run, in its own process, writing into the job's run dir: there
Lightning's re-launch repeats that one job, which is what DDP needs.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from loki_exp.errors import LokiError

if TYPE_CHECKING:
    from loki_exp.config_schema import RunConfig

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def needs_own_process(cfg: RunConfig) -> bool:
    """A multi-process job of a local sweep (under SLURM every task already is one rank)."""
    # Imported here: every command line imports this module (cli.py: in_multirun), and
    # Lightning takes seconds to import, e.g. for `python -m loki_exp.data.assets fetch`.
    from lightning.fabric.plugins.environments import SLURMEnvironment

    par = cfg.parallelism
    ranks = par.devices * par.num_nodes
    return in_multirun() and par.mode != "auto" and ranks > 1 and not SLURMEnvironment.detect()


def ran_in_own_process(cfg: RunConfig, module: str) -> bool:
    """Run this job in its own process when it needs one (see the module docstring);
    True when it did, and succeeded."""
    if not needs_own_process(cfg):
        return False
    code = _run_in_own_process(module)
    if code:
        raise LokiError(f"job failed in its own process (exit code {code}); its log is in "
                        f"{HydraConfig.get().runtime.output_dir}")
    return True


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _run_in_own_process(module: str) -> int:
    """Run this sweep job as ``python -m <module> <its overrides>`` into its run dir."""
    hc = HydraConfig.get()
    command = [sys.executable, "-m", module, *hc.overrides.task,
               f"hydra.run.dir={_quoted(hc.runtime.output_dir)}", "hydra.mode=RUN",
               "hydra.output_subdir=null"]  # the sweep already wrote this job's .hydra/
    for source in hc.runtime.config_sources:  # keep any --config-dir the sweep was given
        if source.provider == "command-line" and source.schema == "file":
            command.insert(3, f"--config-dir={source.path}")
    log.info("job %s (%s) runs in its own process", hc.job.num, " ".join(hc.overrides.task))
    return subprocess.run(command, cwd=hc.runtime.cwd).returncode
