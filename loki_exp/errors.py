"""One exception type for bad user input (the config's checks are in
:mod:`loki_exp.config_check`; the CLI wrapper that prints it in one line in :mod:`loki_exp.cli`)."""

from __future__ import annotations


class LokiError(Exception):
    """A problem the user can fix (bad config value, missing file, corrupt cache).

    The CLI prints its message alone, without a traceback, and exits with code 2; in a
    ``--multirun`` the failed job is recorded and the sweep goes on with the next job.
    """
