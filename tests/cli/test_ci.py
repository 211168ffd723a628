"""CI's entry point: exactly `make test`, with pytest's exit codes handled where they are seen."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ci(pytest_args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTEST_ARGS": pytest_args}
    return subprocess.run([str(ROOT / ".ci" / "run")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.cli
def test_ci_treats_an_empty_selection_as_an_empty_run():
    # Before, make turned pytest's 5 into 2, so .ci/run's branch for 5 could never fire.
    empty = _ci("-p no:cacheprovider tests/cli/test_ci.py -k zz_no_such_test")
    assert empty.returncode == 0, empty.stdout + empty.stderr
    assert "pytest collected no tests" in empty.stdout
