"""Progress a person can see in a terminal *and* in a log file.

On a terminal, Lightning's bar (and tqdm) redraw one line with carriage returns; sent to a
file or a CI log that is either one endless line or, for some loops, nothing for twenty
minutes. When stderr is not a terminal, every long loop here prints one plain line every
``PERCENT`` percent or ``SECONDS`` seconds, whichever comes first: done/total, percent,
elapsed, ETA, and the loss where there is one.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import lightning as L

PERCENT = 5.0
SECONDS = 60.0
T = TypeVar("T")

log = logging.getLogger("loki_exp.progress")


def plain_lines() -> bool:
    """True when progress should be plain lines (stderr is not a terminal)."""
    return not sys.stderr.isatty()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """``update(done)``: a line when PERCENT or SECONDS have passed since the last one."""

    def __init__(self, what: str, total: int, stream=None):
        self.what, self.total = what, max(int(total), 1)
        self.stream = stream or sys.stderr
        self.start = self.last_time = time.monotonic()
        self.last_pct = 0.0

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        pct = 100.0 * done / self.total
        if done < self.total and pct - self.last_pct < PERCENT and now - self.last_time < SECONDS:
            return
        self.last_pct, self.last_time = pct, now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        eta_text = _clock(eta) if eta == eta else "?"
        line = (f"{self.what}: {done}/{self.total} ({pct:.0f}%), {_clock(elapsed)} elapsed, "
                f"ETA {eta_text}{', ' + extra if extra else ''}")
        print(line, file=self.stream, flush=True)


def track(items: Iterable[T], what: str, total: int) -> Iterator[T]:
    """``for x in track(xs, "BFCL generation", n)``: plain lines off a terminal."""
    progress = Progress(what, total) if plain_lines() else None
    done = 0
    for item in items:
        yield item
        done += 1
        if progress:
            progress.update(done)


class LineProgress(L.Callback):
    """Lightning's progress as plain lines (training steps with the loss; KVA prompts)."""

    def __init__(self, what: str = "train"):
        self.what = what
        self.progress: Progress | None = None
        self.done = 0  # predict batches seen (the predict loop keeps no global count)

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else \
            trainer.estimated_stepping_batches
        self.progress = Progress(f"{self.what} steps", int(total))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.progress and trainer.is_global_zero:
            loss = trainer.callback_metrics.get("train/loss")
            self.progress.update(trainer.global_step,
                                 f"loss {float(loss):.4f}" if loss is not None else "")

    def on_predict_start(self, trainer, pl_module) -> None:
        batches = trainer.num_predict_batches
        self.progress = Progress(f"{self.what} batches", int(sum(batches)))
        self.done = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                             dataloader_idx=0) -> None:
        self.done += 1
        if self.progress and trainer.is_global_zero:
            self.progress.update(self.done)


def progress_callbacks(what: str) -> tuple[bool, list[L.Callback]]:
    """(Lightning's bar on?, extra callbacks) for a trainer: the bar on a terminal, else lines."""
    return (False, [LineProgress(what)]) if plain_lines() else (True, [])
