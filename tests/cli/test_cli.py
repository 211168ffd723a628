"""The CLI as a user runs it: config printing, clear one-line errors, nothing left behind."""


import pytest

from tests.support.caches import linked_cache
from tests.support.cli import run_cli
from tests.support.paths import ROOT


@pytest.mark.cli
def test_cfg_job_shows_the_three_choices():
    proc = run_cli("--cfg", "job", "model=llama", "strategy=global_lowest", "quota=30")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "name: Llama-3.1-8B-Instruct" in out
    assert "name: global_lowest" in out
    assert "quota: 30\n" in out.splitlines(keepends=True)


@pytest.mark.cli
def test_unknown_model_option_is_one_clear_error():
    proc = run_cli("model=nope")
    assert proc.returncode != 0
    assert "Could not find 'model/nope'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.cli
def test_missing_local_model_path_is_one_clear_error(tmp_path):
    proc = run_cli("model=llama", f"model.name_or_path={tmp_path}/nope",
                   f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert "loki_exp error: model.name_or_path=" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.cli
@pytest.mark.parametrize("quota", ["0", "-5", "101"])
def test_quota_out_of_range(tmp_path, quota):
    proc = run_cli("model=tiny_llama", f"quota={quota}", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    assert f"quota={quota} must be a number in (0, 100]" in proc.stderr


def _store(stdout: str) -> str:
    """The printed store path: the one stdout line that is exactly a path (other ranks' log
    lines share the pipe)."""
    paths = [line for line in stdout.splitlines() if line.startswith("/") and line.endswith(".h5")]
    assert len(paths) == 1, stdout[-2000:]
    return paths[0]


@pytest.mark.distributed
def test_analyse_alone_prints_the_store_path_and_ddp_stores_each_sample_once(tmp_path):
    """Two gloo processes split the probe set; the merged store equals one process's."""
    import h5py
    import numpy as np

    common = ["model=tiny_llama", "kva.limit=5", "kva.steps=3"]
    linked_cache(tmp_path / "one")
    linked_cache(tmp_path / "two")
    one = run_cli(*common, f"paths.cache_dir={tmp_path}/one", f"hydra.run.dir={tmp_path}/r1",
                  module="loki_exp.analyse")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(*common, "parallelism=ddp", "parallelism.accelerator=cpu",
                  f"paths.cache_dir={tmp_path}/two", f"hydra.run.dir={tmp_path}/r2",
                  module="loki_exp.analyse")
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _store(one.stdout), _store(two.stdout)
    assert a.endswith(".h5") and b.endswith(".h5") and a.split("/")[-1] == b.split("/")[-1]
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert list(fa["sample_id"]) == list(fb["sample_id"]) and len(fb["sample_id"]) == 5
        # Each DDP process runs one thread (other BLAS blocking): equal up to float noise.
        ref, got = fa["attributions"][()], fb["attributions"][()]
        assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()
        np.testing.assert_array_equal(fa["target_token"][()], fb["target_token"][()])
    # No shard files are left behind.
    assert not list((tmp_path / "two").rglob("*.partial"))


@pytest.mark.cli
def test_slurm_launcher_config_takes_nodes_and_tasks_from_parallelism():
    proc = run_cli("--cfg", "all", "--resolve", "hydra/launcher=slurm",
                   "parallelism=ddp_multinode", "parallelism.num_nodes=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "    nodes: 4" in lines and "    tasks_per_node: 8" in lines
    assert "    gpus_per_node: 8" in lines


@pytest.mark.cli
def test_help_is_this_project_s_and_lists_every_group_with_its_options():
    out = run_cli("--help", timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("loki_exp: LoKI") and "Powered by Hydra" not in text
    for stage in ("analyse", "select", "implant", "export", "evaluate"):
        assert f"\n  {stage} " in text
    assert "python -m loki_exp.train --multirun quota=5,10,30 method=loki,lora,full" in text
    assert "multirun/<date>/<time>/<job>/" in text
    for group in sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hydra"):
        options = ", ".join(sorted(f.stem for f in group.glob("*.yaml")))
        assert f"\n{group.name}: {options}\n" in text, group.name
