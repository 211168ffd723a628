"""Jobs sharing one cache at once (a sweep's jobs, SLURM tasks): each store key and base-score
key is computed once, the others wait and read it; nothing is left half-written."""

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from tests.conftest import CONF_DIR, linked_cache

OVERRIDES = ["model=tiny_llama", "kva.limit=2", "kva.dtype=float32", "eval.benchmarks=[arc_easy]",
             "eval.limit=3", "eval.bpb=[]", "eval.drift_prompts=0", "eval.bfcl_categories=null",
             "eval.task_limit=2", "eval.max_new_tokens=4"]


def _job(cache: str, out: str) -> None:
    """One job: the KVA store and the base scores, saying whether it computed them."""
    import logging

    os.environ["LOKI_EXP_CACHE"] = cache
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from hydra import compose, initialize_config_dir

    from loki_exp.data.tasks import load_task
    from loki_exp.evaluation.evaluate import base_scores
    from loki_exp.kva.stage import run_analyse
    from loki_exp.kva.store import StoreView
    from loki_exp.models import load_model

    torch.set_num_threads(1)
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("loki_exp").addHandler(Keep())
    logging.getLogger("loki_exp").setLevel(logging.INFO)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=OVERRIDES)
    loaded = load_model(cfg.model)
    store = run_analyse(cfg, loaded)
    with StoreView(store) as view:
        np.save(Path(out).with_suffix(".npy"), np.concatenate(list(view.chunks())))
    scores = base_scores(cfg, loaded, load_task(cfg.dataset))
    Path(out).write_text(json.dumps({
        "kva_computed": any(m.startswith("KVA (preset") for m in messages),
        "base_computed": not any("base scores from cache" in m for m in messages),
        "bench": scores["bench"], "task": scores["task"]}))


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
