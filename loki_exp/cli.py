"""What every command line entry point shares: a user error ends the process with one line
(exit code 2) and leaves no empty run dir behind; in a ``--multirun`` the failed job is
recorded and the sweep goes on."""

from __future__ import annotations

import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loki_exp.errors import LokiError
from loki_exp.sweep_job import in_multirun


def report_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI task so a LokiError ends the process with one clear line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LokiError as err:
            print(f"loki_exp error: {err}", file=sys.stderr)
            if in_multirun():
                # Hydra records an Exception as this job's failure and runs the other jobs,
                # then reports the first failure; SystemExit would end the whole sweep here.
                raise
            discard_unused_run_dir()
            raise SystemExit(2) from None
    return wrapper


def discard_unused_run_dir() -> None:
    """Remove this run's dir when it holds only what Hydra wrote at start (config, log):
    a run stopped by bad input leaves no empty run behind. A dir with results (a resumed
    run, say) stays."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    hydra_files = {hc.output_subdir, f"{hc.job.name}.log"}
    if out.is_dir() and {p.name for p in out.iterdir()} <= hydra_files:
        shutil.rmtree(out)
