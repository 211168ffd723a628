"""Checks of the configuration against other libraries: ``_target_`` entries, a logger's
arguments (its class's, or ``wandb.init``'s), and ``trainer.lightning``'s Trainer flags."""

from __future__ import annotations

import inspect
from typing import Any

from loki_exp.errors import LokiError


def check_targets(at: str, entries: list[Any] | None) -> None:
    for i, entry in enumerate(entries or []):
        check_target(f"{at}[{i}]", entry)


def check_target(at: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise LokiError(f"{at}={entry!r} must be a mapping with a _target_ (a class path) "
                        "and its arguments")
    if not isinstance(entry.get("_target_"), str):
        raise LokiError(f"{at}._target_={entry.get('_target_')!r} must be a dotted class "
                        "path (package.module.Class)")


def check_logger(at: str, spec: Any) -> None:
    """A logger spec: a _target_ and keys its class takes (a WandbLogger's other keys go to
    ``wandb.init``, so they are checked against it)."""
    from hydra.utils import get_class
    from lightning.pytorch.loggers import WandbLogger

    check_target(at, spec)
    target = spec["_target_"]
    try:
        cls = get_class(target)
    except Exception:  # Hydra wraps the import error in its own
        raise LokiError(f"{at}._target_={target!r} cannot be imported; expected the dotted "
                        "path of a logger class") from None
    params = inspect.signature(cls).parameters
    known = set(params)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        if not issubclass(cls, WandbLogger):
            return  # its other keys go somewhere we cannot see
        import wandb

        known |= set(inspect.signature(wandb.init).parameters)
    unknown = sorted(k for k in spec  # _target_, _convert_ ...: Hydra's own keys
                     if not (k.startswith("_") and k.endswith("_")) and k not in known)
    if unknown:
        raise LokiError(f"{at}.{unknown[0]} is not an argument of {target}"
                        + (" or wandb.init" if issubclass(cls, WandbLogger) else ""))


# Trainer flags loki_exp sets from its own keys: trainer.lightning must not set them too.
OWNED_FLAGS = {
    "accelerator": "parallelism.accelerator", "devices": "parallelism.devices",
    "num_nodes": "parallelism.num_nodes", "strategy": "parallelism.mode",
    "precision": "trainer.precision", "max_steps": "trainer.max_steps",
    "max_epochs": "trainer.max_epochs", "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "gradient_clip_val": "trainer.gradient_clip_val", "log_every_n_steps": "trainer.log_every_n_steps",
    "deterministic": "trainer.deterministic", "callbacks": "trainer.callbacks",
    "logger": "the logger group", "default_root_dir": "hydra.run.dir",
    "enable_checkpointing": "trainer.checkpoint_every_n_steps",
    "use_distributed_sampler": "nothing (loki_exp's sampler splits the global batch)",
    "enable_progress_bar": "nothing (a bar on a terminal, plain lines otherwise)",
}


def check_lightning_flags(at: str, lightning: dict[str, Any]) -> None:
    """``trainer.lightning``: real Trainer flags, none of those loki_exp sets itself."""
    import lightning as L

    flags = [k for k in lightning if k != "_target_"]
    for key in flags:
        if key in OWNED_FLAGS:
            raise LokiError(f"{at}.{key} is set through {OWNED_FLAGS[key]}; set it there")
    if lightning.get("_target_", "lightning.pytorch.Trainer") == "lightning.pytorch.Trainer":
        known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
        unknown = [k for k in flags if k not in known]
        if unknown:
            raise LokiError(f"{at} has {unknown}: not flags of lightning.pytorch.Trainer "
                            f"{L.__version__}")
