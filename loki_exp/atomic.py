"""Atomic writes: a reader (a report, a resumed job, another job sharing the cache) sees the
old file or the new one, never half of one.

Each write goes to a temporary name unique to this process and thread in the same folder,
then ``os.replace`` puts it in place (atomic on POSIX within a file system). A failed
write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock


def _temp_name(path: Path) -> Path:
    # pid + thread + random: two jobs (or threads) writing the same target never share a temp.
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-"
                          f"{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """``with writing(p) as tmp: save(tmp)``: ``p`` appears only once ``save`` succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with writing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    return write_text(path, json.dumps(obj, **dumps))


def cache_lock(path: str | os.PathLike) -> FileLock:
    """The lock of one cache entry (a KVA store key, a base-score key, a converted model):
    jobs sharing a cache compute an entry once; the others wait, then find it finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.parent / f".{path.name}.lock")


@contextlib.contextmanager
def writing_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with writing_dir(d) as tmp: fill(tmp)``: the filled folder is renamed into place
    before the old ``d`` (if any) is removed, so ``d`` is always whole, old or new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _temp_name(path), _temp_name(path)
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            os.replace(path, old)  # a rename: the old folder stays whole until removed
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
