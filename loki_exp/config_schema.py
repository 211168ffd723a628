"""The configuration schema: every group's keys, types, ranges and choices, as dataclasses.

These are the types the stages receive: ``config_check.check_config`` checks a composed
config against them and returns a ``RunConfig`` whose groups are instances of them
(``OmegaConf.to_object``), defaults filled in, so stages read attributes and never cast a
value or restate a default. Ranges and choices are field metadata (``config_fields.spec``);
the rules that tie fields together live with the checker (``config_check.RULES``), which
also picks a group's shape by a value inside it (``method.name``, ``model.source``,
``dataset.source``). This module imports no stage: the stages import it. Choices that live
with the code that acts on them (the model dtypes, the selection strategies, the stages'
names) are read from there by module path when a config is checked (``config_fields``),
not copied here.

Why dataclasses through OmegaConf rather than pydantic models: the groups are already
OmegaConf structured configs (Hydra composes them; OmegaConf merges a group into its
dataclass and names an unknown key), the field metadata carries the ranges and choices the
checker words as one line each, and no second validation library is needed. Why not
Hydra's ConfigStore as the groups' schemas: a schema there types a group at compose time, but
cannot pick a shape by a value inside the group (a LoRA method has a rank, full fine-tuning
none), and its errors are tracebacks, not the one line a user error gets here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from loki_exp.config_fields import choices_from as _from
from loki_exp.config_fields import spec as _spec


def _list(choices: tuple | Callable[[], Any] | None = None) -> Any:
    return _spec(factory=list, choices=choices)


# -- choices kept where their data lives ---------------------------------------------------

def _captum_methods() -> tuple:
    from loki_exp.upstream import captum_quadrature

    return tuple(captum_quadrature()[0])


def _precisions() -> tuple:
    from loki_exp.upstream import lightning_precisions

    return tuple(lightning_precisions())


_dtypes = _from("loki_exp.models", "DTYPES")


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


@dataclass
class RandomModel(ModelBase):
    init_seed: int = 0
    tokenizer_asset: Asset = field(default_factory=Asset)
    config: dict[str, Any] = field(default_factory=dict)  # a transformers config, by _target_


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


@dataclass
class Strategy:
    name: str = _spec(MISSING, choices=_from("loki_exp.selection", "STRATEGIES"))
    score: str = _spec("signed", choices=_from("loki_exp.selection", "SCORES"))
    seed: int = 0  # strategy=random: the draw


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
    compile: bool = False  # decoder layers compiled for training (loki_exp/implant/compiled.py)
    resume_from: str | None = None  # checked with the implant stage (a file, or "last")
    callbacks: list[Any] | None = field(default_factory=list)
    lightning: dict[str, Any] | None = field(default_factory=dict)


@dataclass
class Eval:
    source: str = _spec("offline", choices=("offline", "lm_eval", "paper"))
    benchmarks: list[str] | None = field(default_factory=list)
    limit: int | None = _spec(60, ge=1)
    forgetting_metric: str = _spec("acc_norm", choices=_from("loki_exp.evaluation.suite",
                                                                "FORGETTING_METRICS"))
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
    task_dataset: Any = None  # a dataset group entry, checked into its dataclass
    max_new_tokens: int = _spec(128, ge=1)
    batch_size: int = _spec(8, ge=1)
    generation_batch_tokens: int = _spec(8192, ge=1)
    paper_data: str | None = None
    paper_max_new_tokens: int | None = _spec(None, ge=1)
    allow_code_execution: bool = False


WANDB_MODES = ("online", "offline", "disabled", "shared")


@dataclass
class Logger:
    # Each a Lightning logger by _target_ (conf/logger), or null/false for none.
    csv: Any = None
    wandb: Any = None
    extra: list[Any] | None = field(default_factory=list)


@dataclass
class QuotaLrScale:
    quotas: list[float] = MISSING
    scales: list[float] = MISSING


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


@dataclass
class RunConfig:
    """The checked configuration of one run, as the stages receive it
    (``config_check.check_config``).

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

