"""What a checkpoint was trained on, so a resume cannot load it into another run.

A LoKI checkpoint holds only the trained rows' values; resumed with other rows of the same
shape, Lightning would load them into the wrong rows without a word. Every checkpoint
records the method, a hash of the selected rows, the base model's fingerprint and a hash of
the encoded training data; a resume whose own differ is refused before training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loki_exp.errors import LokiError

KEY = "loki_run_identity"  # the checkpoint entry


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_identity(method: str, positions: list[list[int]] | None, fingerprint: str,
                 train: list[dict[str, list[int]]]) -> dict[str, str]:
    return {"method": method,
            "rows": "none" if positions is None else _digest([sorted(r) for r in positions]),
            "model": fingerprint,
            "data": _data_digest(train)}


def _data_digest(train: list[dict[str, list[int]]]) -> str:
    """A hash of the encoded examples, fed example by example (no one big string)."""
    digest = hashlib.sha256()
    for example in train:
        for key in ("input_ids", "labels"):
            digest.update(np.asarray(example[key], dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:16]


def differences(saved: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """The identity fields in which a checkpoint differs from this run (all if it has none)."""
    if not saved:
        return list(current)
    return [k for k in current if saved.get(k) != current[k]]


def refusal(path: str, diff: list[str], saved: dict[str, str] | None) -> LokiError:
    if not saved:
        return LokiError(f"trainer.resume_from={path!r} records no run identity (written by an "
                         "older loki_exp): refused, it cannot be checked against this run")
    return LokiError(f"trainer.resume_from={path!r} was trained with other "
                     f"{', '.join(diff)} than this run (selected rows, method, base model "
                     "weights and training data must all match to resume): refused")


def check_resume(path: str | None, current: dict[str, str]) -> None:
    """Refuse resuming from ``path`` when what it was trained on differs from ``current``."""
    if path is None:
        return
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    saved = ckpt.get(KEY)
    diff = differences(saved, current)
    if diff:
        raise refusal(path, diff, saved)
