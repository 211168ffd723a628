"""The private names of Lightning and Captum loki_exp relies on, each behind one function.

None of them is public API, so an upgrade may move them; each adapter then fails with one
message naming what moved and the installed version (tests/models/test_upstream.py checks every
one against the installed packages), instead of a bare ImportError deep in a stage.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import Any, get_args


class UpstreamMoved(RuntimeError):
    pass


def _moved(name: str, package: str, err: Exception) -> UpstreamMoved:
    return UpstreamMoved(f"{name} is not where loki_exp expects it in {package} "
                         f"{version(package)} ({err}); update loki_exp/upstream.py")


def _attr(module: str, name: str, package: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise _moved(f"{module}.{name}", package, err) from None


def lightning_precisions() -> tuple[str, ...]:
    """Lightning's own list of precision names (``trainer.precision`` is checked against it
    before any stage); the literal type behind ``Trainer(precision=...)``."""
    names = get_args(_attr("lightning.fabric.connector", "_PRECISION_INPUT_STR", "lightning"))
    if not names or not all(isinstance(n, str) for n in names):
        raise _moved("lightning.fabric.connector._PRECISION_INPUT_STR", "lightning",
                     ValueError(f"not a Literal of names: {names!r}"))
    return tuple(names)


def batches_processed(trainer) -> int:
    """Batches of the current epoch the fit loop has processed (restored on resume): where a
    resumed run's sampler continues. ``processed``, not ``completed``: a step-end checkpoint
    is written before ``completed`` counts its batch."""
    try:
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    except AttributeError as err:
        raise _moved("Trainer.fit_loop.epoch_loop.batch_progress.current.processed",
                     "lightning", err) from None


def captum_quadrature() -> tuple[Any, Any]:
    """Captum's quadrature rules: (the supported method names, ``approximation_parameters``
    returning step sizes and alphas for n points)."""
    module = "captum.attr._utils.approximation_methods"
    return (_attr(module, "SUPPORTED_METHODS", "captum"),
            _attr(module, "approximation_parameters", "captum"))
