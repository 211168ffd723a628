"""The CLI as a separate process, as a user runs it."""

import subprocess
import sys

from tests.support.paths import ROOT


def run_cli(*args, module="loki_exp.train", env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
