"""User-configured Lightning callbacks, for the training and the KVA trainers."""

from __future__ import annotations

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from loki_exp.errors import LokiError


def user_callbacks(entries) -> list[L.Callback]:
    """Lightning callbacks from the config (``trainer.callbacks``, ``kva.callbacks``): a list of
    ``{_target_: ..., ...}`` entries built with Hydra's instantiate."""
    callbacks = []
    for entry in entries or []:
        try:
            callbacks.append(instantiate(entry))
        except InstantiationException as err:
            raise LokiError(f"callback {entry.get('_target_')!r} could not be built: "
                            f"{str(err).splitlines()[0]}") from None
    bad = [type(c).__name__ for c in callbacks if not isinstance(c, L.Callback)]
    if bad:
        raise LokiError(f"callbacks must be lightning Callbacks; got {bad}")
    return callbacks
