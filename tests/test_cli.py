"""The CLI as a user runs it: config printing, clear one-line errors, nothing left behind."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_cli(*args, module="loki_exp.train", env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cfg_job_shows_the_three_choices():
    proc = run_cli("--cfg", "job", "model=llama", "strategy=global_lowest", "quota=30")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "name: Llama-3.1-8B-Instruct" in out
    assert "name: global_lowest" in out
    assert "\nquota: 30\n" in out


def test_unknown_model_option_is_one_clear_error():
    proc = run_cli("model=nope")
    assert proc.returncode != 0
    assert "Could not find 'model/nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_local_model_path_is_one_clear_error(tmp_path):
    proc = run_cli("model=llama", f"model.name_or_path={tmp_path}/nope",
                   f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert "loki_exp error: model.name_or_path=" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("quota", ["0", "-5", "101"])
def test_quota_out_of_range(tmp_path, quota):
    proc = run_cli("model=tiny_llama", f"quota={quota}", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert f"quota={quota} is out of range; expected a number in (0, 100]" in proc.stderr
