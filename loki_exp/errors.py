"""One exception type for bad user input, and the CLI wrapper that prints it in one line."""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("loki_exp")


class LokiError(Exception):
    """A problem the user can fix (bad config value, missing file, corrupt cache).

    The CLI prints its message alone, without a traceback, and exits with code 2; in a
    ``--multirun`` the failed job is recorded and the sweep goes on with the next job.
    """


def check_int_at_least(name: str, value: Any, minimum: int, context: str = "") -> None:
    """Refuse anything but an int >= minimum (bools included), naming the config key."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise LokiError(f"{name}={value!r} must be {expected}{context}")


def check_positive_int(name: str, value: Any, context: str = "") -> None:
    check_int_at_least(name, value, 1, context)


def report_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI task so a LokiError ends the process with one clear line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LokiError as err:
            from loki_exp.sweep_job import in_multirun

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
