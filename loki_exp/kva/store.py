"""The KVA store: attributions [N, L, D] in HDF5, written incrementally, resumable, merged.

While KVA runs, every process appends to its own shard file in ``<key>.partial/``; each
row is flushed with the shard's ``n_complete`` count, so a run killed at any point loses at
most the row being written. A rerun reads which probe indices the shards already hold,
computes only the rest in a new shard, and the final merge writes the rows in probe order
to ``<key>.h5`` (temporary name, then rename). Samples are independent and deterministic,
so a resumed store is bit-identical to an uninterrupted one.

Final layout: datasets ``attributions`` [N, L, D], ``sample_id`` [N], ``prompt`` [N],
``target_token`` [N], ``target_prob`` [N]; provenance in file attributes. The reader also
accepts the original LoKI code's layout (dataset ``dataset`` [N, L, D], ``metadata_*``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from loki_exp import atomic
from loki_exp.errors import LokiError

log = logging.getLogger(__name__)

STR = h5py.string_dtype("utf-8")
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def partial_dir(final: Path) -> Path:
    return final.with_name(final.stem + ".partial")


class ShardWriter:
    """Appends finished samples of one process to one shard file, flushing every row."""

    def __init__(self, path: Path, n_layers: int, n_nodes: int, store_dtype: str = "float32"):
        if store_dtype not in STORE_DTYPES:
            raise LokiError(f"kva.store_dtype={store_dtype!r} is not known; expected one of "
                            f"{sorted(STORE_DTYPES)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = h5py.File(path, "w")
        f = self.file
        f.create_dataset("attributions", (0, n_layers, n_nodes), STORE_DTYPES[store_dtype],
                         maxshape=(None, n_layers, n_nodes), chunks=(1, n_layers, n_nodes))
        f.create_dataset("index", (0,), np.int64, maxshape=(None,))
        f.create_dataset("sample_id", (0,), STR, maxshape=(None,))
        f.create_dataset("prompt", (0,), STR, maxshape=(None,))
        f.create_dataset("target_token", (0,), np.int64, maxshape=(None,))
        f.create_dataset("target_prob", (0,), np.float32, maxshape=(None,))
        f.attrs["n_complete"] = 0
        f.flush()

    def append(self, index: int, sample_id: str, prompt: str, scores: np.ndarray,
               target_token: int, target_prob: float) -> None:
        f = self.file
        n = int(f.attrs["n_complete"])
        for name, value in (("attributions", scores), ("index", index), ("sample_id", sample_id),
                            ("prompt", prompt), ("target_token", target_token),
                            ("target_prob", target_prob)):
            f[name].resize(n + 1, axis=0)
            f[name][n] = value
        f.attrs["n_complete"] = n + 1  # only rows below this count are trusted on resume
        f.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


@dataclass
class ShardRows:
    path: Path
    n: int


def completed_rows(final: Path) -> dict[int, ShardRows]:
    """Probe index -> (shard, row) for every sample the partial shards already hold.

    A shard that cannot be read (the process died inside an HDF5 write) is skipped and its
    samples are computed again; it is never renamed or deleted here, since it may be another
    process's live file (the store's lock, taken by ``run_analyse``, keeps other jobs out).
    """
    done: dict[int, ShardRows] = {}
    pdir = partial_dir(final)
    for shard in sorted(pdir.glob("*.h5")) if pdir.exists() else []:
        try:
            with h5py.File(shard, "r") as f:
                n = int(f.attrs["n_complete"])
                for row, index in enumerate(f["index"][:n]):
                    done.setdefault(int(index), ShardRows(shard, row))
        except (OSError, KeyError) as err:
            log.warning("KVA shard %s is unreadable (%s); its samples will be recomputed",
                        shard.name, err)
    return done


def merge_shards(final: Path, n_samples: int, attrs: dict) -> Path:
    """Write every sample, in probe order, from the shards into ``final``; drop the shards."""
    done = completed_rows(final)
    missing = sorted(set(range(n_samples)) - set(done))
    if missing:
        raise LokiError(f"cannot finish KVA store {final.name}: {len(missing)} of {n_samples} "
                        f"samples are missing (first: {missing[:5]})")
    handles: dict[Path, h5py.File] = {}
    try:
        for rows in done.values():
            if rows.path not in handles:
                handles[rows.path] = h5py.File(rows.path, "r")
        first = next(iter(handles.values()))["attributions"]
        with atomic.writing(final) as tmp, h5py.File(tmp, "w") as out:
            shape = (n_samples, *first.shape[1:])
            out.create_dataset("attributions", shape, first.dtype, chunks=(1, *shape[1:]))
            for name, dtype in (("sample_id", STR), ("prompt", STR), ("target_token", np.int64),
                                ("target_prob", np.float32)):
                out.create_dataset(name, (n_samples,), dtype)
            for index in range(n_samples):
                src = handles[done[index].path]
                row = done[index].n
                for name in ("attributions", "sample_id", "prompt", "target_token", "target_prob"):
                    out[name][index] = src[name][row]
            out.attrs.update({k: v for k, v in attrs.items() if v is not None})
            out.attrs["n_samples"] = n_samples
    finally:
        for h in handles.values():
            h.close()
    shutil.rmtree(partial_dir(final), ignore_errors=True)
    return final


class StoreView:
    """Read access to a finished store, in our layout or the original LoKI layout."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise LokiError(f"KVA store {self.path} does not exist")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise LokiError(f"KVA store {self.path} is not a readable HDF5 file ({err}); it is "
                            "truncated or corrupt: delete it to recompute") from None
        if "attributions" in self.file:
            self.layout = "loki_exp"
            self.scores = self.file["attributions"]
            self.attrs = dict(self.file.attrs)
        elif "dataset" in self.file:
            self.layout = "original"
            self.scores = self.file["dataset"]
            self.attrs = {k.removeprefix("metadata_"): v for k, v in self.file.attrs.items()}
        else:
            self.file.close()
            raise LokiError(f"KVA store {self.path} has neither an 'attributions' dataset nor "
                            f"the original 'dataset' one (found {list(self.file)})")
        if self.scores.ndim != 3:
            shape = self.scores.shape
            self.file.close()
            raise LokiError(f"KVA store {self.path}: attributions have shape {shape}, "
                            "expected [N, L, D]")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.scores.shape)

    def check_grid(self, n_layers: int, n_nodes: int, what: str = "the model") -> None:
        _, L, D = self.shape
        if (L, D) != (n_layers, n_nodes):
            raise LokiError(f"KVA store {self.path} holds [L, D] = [{L}, {D}], but {what} has "
                            f"[{n_layers}, {n_nodes}] (layers x down_proj rows)")

    def chunks(self, size: int = 256) -> Iterator[np.ndarray]:
        """Attributions in blocks of ``size`` samples, as float32 (bounded memory)."""
        n = self.shape[0]
        for start in range(0, n, size):
            yield np.asarray(self.scores[start:start + size], dtype=np.float32)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    def __enter__(self) -> StoreView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
