"""One exception type for bad user input, and the checks that raise it (the CLI wrapper
that prints it in one line is in :mod:`loki_exp.cli`)."""

from __future__ import annotations

from typing import Any


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
