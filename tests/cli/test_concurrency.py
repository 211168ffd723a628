"""Jobs sharing one cache at once (a sweep's jobs, SLURM tasks): each store key and base-score
key is computed once, the others wait and read it; nothing is left half-written."""

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from tests.support.caches import linked_cache
from tests.support.paths import CONF_DIR

# paths.output_dir: outside a Hydra run its default does not resolve; these jobs write no run dir.
OVERRIDES = ["paths.output_dir=/tmp/unused", "model=tiny_llama", "kva.limit=2", "kva.dtype=float32",
             "eval.benchmarks=[arc_easy]",
             "eval.limit=3", "eval.bpb=[]", "eval.drift_prompts=0", "eval.task_bpb_items=1",
             "eval.bfcl_trained_items=1", "eval.bfcl_irrelevance_items=0",
             "eval.bfcl_transfer_items=0", "eval.max_new_tokens=4"]


def _kept_log_messages() -> list[str]:
    """The loki_exp log messages of this process, as they come (to see what a job computed)."""
    import logging

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("loki_exp").addHandler(Keep())
    logging.getLogger("loki_exp").setLevel(logging.INFO)
    return messages


def _job(cache: str, out: str) -> None:
    """One job: the KVA store and the base scores, saying whether it computed them."""
    os.environ["LOKI_EXP_CACHE"] = cache
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from hydra import compose, initialize_config_dir

    from loki_exp.config_check import check_config
    from loki_exp.data.tasks import load_task
    from loki_exp.evaluation.evaluate import base_scores
    from loki_exp.kva.stage import run_analyse
    from loki_exp.kva.store import StoreView
    from loki_exp.models import load_model

    torch.set_num_threads(1)
    messages = _kept_log_messages()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = check_config(compose("config", overrides=OVERRIDES))
    loaded = load_model(cfg.model)
    store = run_analyse(cfg, loaded)
    with StoreView(store) as view:
        np.save(Path(out).with_suffix(".npy"), np.concatenate(list(view.chunks())))
    scores = base_scores(cfg, loaded, load_task(cfg.dataset))
    Path(out).write_text(json.dumps({
        "kva_computed": any(m.startswith("KVA (preset") for m in messages),
        "base_computed": not any("base scores from cache" in m for m in messages),
        "bench": scores["bench"], "task": scores["task"]}))


@pytest.mark.cli
def test_three_jobs_on_one_store_key_and_one_base_key(tmp_path):
    cache = linked_cache(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"job{i}.json" for i in range(3)]
    procs = [ctx.Process(target=_job, args=(str(cache), str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = [json.loads(o.read_text()) for o in outs]
    # Exactly one job computed each entry (before: each job computed its own, all at once).
    assert sum(r["kva_computed"] for r in results) == 1
    assert sum(r["base_computed"] for r in results) == 1
    assert all((r["bench"], r["task"]) == (results[0]["bench"], results[0]["task"])
               for r in results)
    arrays = [np.load(o.with_suffix(".npy")) for o in outs]
    assert all(np.array_equal(a, arrays[0]) for a in arrays) and arrays[0].shape[0] == 2
    leftovers = [p for p in cache.rglob("*") if p.name.endswith((".tmp", ".bad"))
                 or p.name.endswith(".partial")]
    assert leftovers == []


def test_an_unreadable_shard_is_skipped_not_renamed(tmp_path):
    """It may be another job's live file: it is never moved aside (before: renamed .bad)."""
    from loki_exp.kva.store import completed_rows, partial_dir

    final = tmp_path / "key.h5"
    shard = partial_dir(final) / "other-job.h5"
    shard.parent.mkdir()
    shard.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # half-written
    assert completed_rows(final) == {}
    assert sorted(p.name for p in shard.parent.iterdir()) == ["other-job.h5"]


def _torchrun_rank(rank: int, port: int, cache: str, out: str) -> None:
    """One rank of a 2-rank job started as torchrun starts it (each runs from the top)."""
    os.environ.update({"LOKI_EXP_CACHE": cache, "HF_HUB_OFFLINE": "1",
                       "TORCHELASTIC_RUN_ID": "loki-test", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": "2",
                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    from hydra import compose, initialize_config_dir

    from loki_exp.config_check import check_config
    from loki_exp.kva import stage
    from loki_exp.models import load_model

    torch.set_num_threads(1)
    stage.LOCK_POLL_S = 1.0  # the other ranks wait through several polls of rank 0's lock
    store_path = stage.store_path

    def marked(*args):  # this rank is about to look at the cache
        Path(out).with_suffix(".ready").touch()
        return store_path(*args)

    stage.store_path = marked
    messages = _kept_log_messages()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = check_config(compose("config", overrides=[
            *OVERRIDES, "parallelism.mode=ddp", "parallelism.accelerator=cpu",
            "parallelism.devices=2"]))
    store = stage.run_analyse(cfg, load_model(cfg.model))
    Path(out).write_text(json.dumps({"store": str(store), "computed": any(
        m.startswith("KVA (preset") for m in messages)}))


@pytest.mark.distributed
def test_torchrun_ranks_follow_their_rank_0_when_another_job_finishes_the_store(tmp_path):
    """Another job holds the store key; this job's rank 1 must not start computing on its own
    (before: it did, and waited in the process group for a rank 0 that found the store
    finished and never joined: a hang until the 30-minute timeout), and waits in step with
    rank 0's polls of the lock rather than in one collective that would time out."""
    import socket
    import time

    from hydra import compose, initialize_config_dir

    from loki_exp import atomic
    from loki_exp.config_check import check_config
    from loki_exp.kva.stage import run_analyse
    from loki_exp.models import load_model

    cache = linked_cache(tmp_path / "cache")
    os.environ["LOKI_EXP_CACHE"] = str(cache)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = check_config(compose("config", overrides=OVERRIDES))
        store = run_analyse(cfg, load_model(cfg.model))  # the other job's finished store
    finally:
        del os.environ["LOKI_EXP_CACHE"]
    aside = store.with_name("aside.h5")
    store.rename(aside)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    lock = atomic.cache_lock(store)
    with lock:  # the other job, still computing
        procs = [ctx.Process(target=_torchrun_rank, args=(r, port, str(cache), str(o)))
                 for r, o in zip((0, 1), outs)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 300
        while not all(o.with_suffix(".ready").exists() for o in outs):
            assert time.monotonic() < deadline and all(p.is_alive() for p in procs)
            time.sleep(0.5)
        time.sleep(5)  # past the check (before the fix, rank 1 then started computing)
        aside.rename(store)  # the other job finishes
    for p in procs:
        p.join(120)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        p.kill()
    assert alive == [False, False] and [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(o.read_text()) for o in outs]
    assert [r["store"] for r in results] == [str(store)] * 2
    assert [r["computed"] for r in results] == [False, False]
