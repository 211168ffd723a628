"""The analyse stage: build the probe set, find or finish the cached KVA store, return its path.

The store is keyed by a content hash of (weights fingerprint, rendered probe prompts, KVA
settings, dtypes), so every quota / strategy / method run of a sweep reuses it, and lives
under ``<cache_dir>/kva/<model name>/<key>.h5``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
import lightning as L
import torch

import loki_exp
from loki_exp import atomic
from loki_exp.callbacks import user_callbacks
from loki_exp.data import assets
from loki_exp.data.mmlu import (
    PROMPT_TEMPLATE,
    ProbeSpec,
    load_probe,
    render_prompt,
    subject_choice,
)
from loki_exp.errors import LokiError
from loki_exp.kva.lightning import KVAModule, KVAStoreWriter, ProbeDataModule, common_prefix
from loki_exp.kva.settings import KVASettings
from loki_exp.kva.store import StoreView, completed_rows, merge_shards
from loki_exp.model_access import node_grid
from loki_exp.models import LoadedModel, torch_dtype
from loki_exp.parallel import kva_strategy, ranks_started_together
from loki_exp.progress import progress_callbacks

if TYPE_CHECKING:
    from loki_exp.config_schema import Kva, RunConfig

log = logging.getLogger(__name__)


def kva_settings(kva: Kva) -> KVASettings:
    return KVASettings(method=kva.method, steps=kva.steps, baseline=kva.baseline,
                       baseline_token_id=kva.baseline_token_id,
                       scale_positions=kva.scale_positions, engine=kva.engine)


def probe_spec(kva: Kva) -> ProbeSpec:
    probe = kva.probe
    return ProbeSpec(source=probe.source, samples_per_subject=probe.samples_per_subject,
                     pick=probe.pick, seed=probe.seed, subjects=subject_choice(probe.subjects),
                     shots=probe.shots, limit=kva.limit, hub_id=probe.hub_id)


def probe_rows(kva: Kva, tokenizer, cache: Any = None) -> list[dict[str, Any]]:
    probe_set = load_probe(probe_spec(kva), cache)
    return [{"index": i, "sample_id": it.sample_id,
             "prompt": render_prompt(tokenizer, it, probe_set.shots_for(it))}
            for i, it in enumerate(probe_set.items)]


def compute_dtype(kva: Kva, loaded: LoadedModel) -> str:
    """``kva.dtype``, or the model's own dtype when it is null (the preset runs "as loaded")."""
    if kva.dtype is None:
        return str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return kva.dtype  # a known name: config_check checked it


def model_for_kva(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model KVA runs on, in its own compute dtype, leaving ``model`` untouched.

    Later stages train and export the model in ``model.dtype``; casting it in place would make
    training precision (and the export's size) depend on whether the store was cached.
    """
    if next(model.parameters()).dtype == dtype:
        return model  # KVA takes no gradients of weights and changes nothing: share it
    return copy.deepcopy(model).to(dtype)


def store_key(fingerprint: str, rows: list[dict[str, Any]], settings: KVASettings,
              dtype: str, store_dtype: str, preset: str | None = None) -> str:
    prompts = hashlib.sha256()
    for row in rows:
        prompts.update(f"{row['sample_id']}\x00{row['prompt']}\x00".encode())
    spec = {"weights": fingerprint, "prompts": prompts.hexdigest(), "settings": asdict(settings),
            "dtype": dtype, "store_dtype": store_dtype, "preset": preset}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def store_path(cache_dir: Any, model_name: str, key: str) -> Path:
    return assets.model_cache_file(cache_dir, "kva", model_name, f"{key}.h5")


def _provenance(cfg: RunConfig, loaded: LoadedModel, settings: KVASettings, key: str,
                grid: tuple[int, int], dtype: str) -> dict[str, Any]:
    probe = cfg.kva.probe
    subjects = subject_choice(probe.subjects)
    return {
        "preset": cfg.kva.preset or "custom",
        "model": loaded.name, "weights_fingerprint": loaded.fingerprint,
        "dtype": dtype, "store_dtype": cfg.kva.store_dtype,
        **{k: v for k, v in asdict(settings).items()},
        "prompt_template": PROMPT_TEMPLATE, "probe_source": probe.source,
        "probe_hub_id": probe.hub_id,
        "samples_per_subject": -1 if probe.samples_per_subject is None else probe.samples_per_subject,
        "probe_pick": probe.pick, "probe_shots": probe.shots,
        "probe_subjects": subjects if isinstance(subjects, str) else json.dumps(list(subjects)),
        "probe_seed": probe.seed, "limit": -1 if cfg.kva.limit is None else cfg.kva.limit,
        "n_layers": grid[0], "n_nodes": grid[1], "store_key": key,
        "loki_exp_version": loki_exp.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def kva_trainer(cfg: RunConfig, callbacks: list) -> L.Trainer:
    par = cfg.parallelism
    bar, lines = progress_callbacks("analyse (KVA)")  # a bar on a terminal, else plain lines
    return L.Trainer(accelerator=par.accelerator, devices=par.devices, num_nodes=par.num_nodes,
                     strategy=kva_strategy(par), inference_mode=False, logger=False,
                     enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=bar,
                     callbacks=[*callbacks, *lines, *user_callbacks(cfg.kva.callbacks)])


def run_analyse(cfg: RunConfig, loaded: LoadedModel) -> Path:
    """Return the finished KVA store for this model and config, computing what is missing."""
    if cfg.kva.store:  # a given store, e.g. one the original LoKI code wrote
        with StoreView(cfg.kva.store) as view:
            view.check_grid(*node_grid(loaded.model))
        return Path(cfg.kva.store)
    settings = kva_settings(cfg.kva)
    dtype = compute_dtype(cfg.kva, loaded)
    rows = probe_rows(cfg.kva, loaded.tokenizer, cfg.paths.cache_dir)
    grid = node_grid(loaded.model)
    key = store_key(loaded.fingerprint, rows, settings, dtype, cfg.kva.store_dtype,
                    cfg.kva.preset)
    path = store_path(cfg.paths.cache_dir, loaded.name, key)
    writer = KVAStoreWriter(path, cfg.kva.store_dtype)
    trainer = kva_trainer(cfg, [writer])
    # Jobs sharing the cache (a sweep, SLURM tasks) compute a store key once: rank 0 of each
    # job holds the key's lock from the check to the merge; the other jobs find it finished.
    # Ranks started together (torchrun, srun) reach the check each on its own, while their
    # rank 0 may still wait for the lock: they bring their process group up first and act on
    # what rank 0 found. Ranks that Lightning launches start inside predict, after rank 0
    # decided under the lock, and find the same.
    together = ranks_started_together(trainer.strategy)
    if together:
        trainer.strategy.setup_environment()
    lock = atomic.cache_lock(path) if trainer.is_global_zero else None
    _acquire(lock, trainer.strategy, together)
    try:
        todo = None
        if trainer.is_global_zero or not together:
            try:
                todo = _todo(path, rows, grid)
            except Exception as err:  # told to every rank, or they would wait forever
                if not together:
                    raise
                todo = f"rank 0 could not read the KVA cache at {path}: {err!r}"
        if together:
            todo = trainer.strategy.broadcast(todo, src=0)
        if isinstance(todo, str):  # rank 0's error, raised on every rank
            raise LokiError(todo)
        if todo is None:
            log.info("KVA store found in cache: %s", path)
            return path
        _compute(cfg, loaded, settings, dtype, rows, todo, trainer)
        if trainer.is_global_zero:
            merge_shards(path, len(rows), _provenance(cfg, loaded, settings, key, grid, dtype))
        trainer.strategy.barrier("kva_merged")
    finally:
        if lock is not None:
            lock.release()
    log.info("KVA store: %s", path)
    return path


LOCK_POLL_S = 60.0


def _acquire(lock, strategy, together: bool) -> None:
    """Rank 0 takes the store key's lock, waiting as long as another job holds it. Ranks
    started together wait in step with it, one broadcast per poll: a single collective would
    time out (Lightning's process group allows 30 minutes) while another job computes for
    hours."""
    if not together:
        if lock is not None:
            lock.acquire()
        return
    while True:
        got = True
        if lock is not None:
            try:
                lock.acquire(timeout=LOCK_POLL_S)
            except filelock.Timeout:
                got = False
        if strategy.broadcast(got, src=0):
            return


def _todo(path: Path, rows: list[dict[str, Any]], grid: tuple[int, int]) -> list | str | None:
    """The probe rows still to compute; None when the store is finished; an error message
    when the cached store does not fit (broadcast, so every rank raises it)."""
    if path.exists():
        try:
            with StoreView(path) as view:
                view.check_grid(*grid)
                if view.shape[0] != len(rows):
                    raise LokiError(f"KVA store {path} holds {view.shape[0]} samples, expected "
                                    f"{len(rows)}; delete it to recompute")
        except LokiError as err:
            return str(err)
        return None
    done = completed_rows(path)
    return [r for r in rows if r["index"] not in done]


def _compute(cfg: RunConfig, loaded: LoadedModel, settings: KVASettings, dtype: str,
             rows: list[dict[str, Any]], todo: list[dict[str, Any]], trainer: L.Trainer) -> None:
    log.info("KVA (preset %s): %d prompts, %d already in partial shards, %d to compute "
             "(engine=%s, baseline=%s, %s x %d, scale_positions=%s, %s)", cfg.kva.preset,
             len(rows), len(rows) - len(todo), len(todo), settings.engine, settings.baseline,
             settings.method, settings.steps, settings.scale_positions, dtype)
    if not todo:
        return
    kva_model = model_for_kva(loaded.model, torch_dtype(dtype))
    # Computed over the whole probe set (fixed by the store key), not just what is left
    # to do, so a resumed run reuses exactly the same prefix keys/values.
    ids = [loaded.tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    module = KVAModule(kva_model, loaded.tokenizer, settings, common_prefix(ids))
    if cfg.kva.batch_size > 1:
        # Batches of similar lengths waste less on left padding; the store is keyed by each
        # prompt's index, so the order it is computed in changes nothing stored.
        length = {r["index"]: len(i) for r, i in zip(rows, ids)}
        todo = sorted(todo, key=lambda r: -length[r["index"]])
    trainer.predict(module, datamodule=ProbeDataModule(todo, cfg.kva.batch_size),
                    return_predictions=False)
    trainer.strategy.barrier("kva_predicted")  # every rank's shard is complete
