"""Test-only Lightning callbacks, loaded by the CLI through ``trainer.callbacks`` / ``kva.callbacks``."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAt(L.Callback):
    """SIGKILL this process (no cleanup, as an OOM kill or a pre-empted node) after the
    given training step or the given number of KVA predict batches."""

    def __init__(self, step: int | None = None, predict_batches: int | None = None):
        self.step, self.predict_batches = step, predict_batches

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.step is not None and trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args) -> None:
        if self.predict_batches is not None and batch_idx + 1 >= self.predict_batches:
            os.kill(os.getpid(), signal.SIGKILL)
