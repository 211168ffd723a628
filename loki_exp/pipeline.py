"""The stage sequence of one run: analyse -> select -> implant -> export -> evaluate.

Each stage is a function of a shared ``RunState``, whose ``cfg`` is the checked, typed
configuration (``config_schema.RunConfig``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from loki_exp import atomic
from loki_exp.config_check import check_config
from loki_exp.config_schema import RunConfig
from loki_exp.data.tasks import TaskData, load_task
from loki_exp.errors import LokiError
from loki_exp.evaluation.curves import CurveEvaluator, EvalCurve, curve_wanted
from loki_exp.evaluation.evaluate import run_evaluate
from loki_exp.implant import methods
from loki_exp.implant.adapter import save_adapter
from loki_exp.implant.export import export_checkpoint
from loki_exp.implant.fit import resume_checkpoint, run_implant
from loki_exp.implant.model_card import write_model_card
from loki_exp.kva.stage import compute_dtype, run_analyse
from loki_exp.kva.store import StoreView
from loki_exp.loggers import build_loggers, close_loggers, log_final_metrics
from loki_exp.model_access import node_grid
from loki_exp.models import LoadedModel, load_model
from loki_exp.parallel import is_global_zero
from loki_exp.precision_record import precision_line, stage_precisions
from loki_exp.run_summary import summary_lines
from loki_exp.selection import (
    ATTRIBUTION_STRATEGIES,
    load_positions,
    save_positions,
    select,
    select_random,
)

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the stages hand on: each field is set by the stage named beside it (None when
    that stage did not run or had nothing to do)."""

    cfg: RunConfig
    output_dir: Path
    loaded: LoadedModel | None = None
    task: TaskData | None = None            # the training dataset (before the stages)
    eval_task: TaskData | None = None       # eval.task_dataset, when the task is scored elsewhere
    kva_dtype: str | None = None            # analyse: the precision KVA computed in
    kva_store: Path | None = None           # analyse
    positions: list[list[int]] | None = None  # select
    positions_path: Path | None = None      # select
    implant: dict[str, Any] | None = None   # implant: parameters, rate, data, losses
    model_dir: Path | None = None           # export
    adapter_dir: Path | None = None         # export (methods whose change is the rows)
    eval_dtype: str | None = None           # evaluate: the precision it scored in
    metrics: dict[str, float] | None = None  # evaluate
    final_point: dict[str, Any] | None = None  # implant: the curve's point at the last step
    timings: dict[str, float] = field(default_factory=dict)
    loggers: list = field(default_factory=list)


def analyse(state: RunState) -> None:
    cfg = state.cfg
    if (cfg.positions_file or not methods.get(cfg.method.name).selects_rows
            or cfg.strategy.name not in ATTRIBUTION_STRATEGIES):
        log.info("analyse: not needed (positions_file given, method=%s, strategy=%s)",
                 cfg.method.name, cfg.strategy.name)
        return
    state.kva_dtype = compute_dtype(cfg.kva, state.loaded)  # before training casts
    state.kva_store = run_analyse(state.cfg, state.loaded)


def select_rows(state: RunState) -> None:
    cfg = state.cfg
    if not methods.get(cfg.method.name).selects_rows:
        log.info("select: method=%s trains no selected rows, skipped", cfg.method.name)
        return
    grid = node_grid(state.loaded.model)
    if cfg.positions_file:
        positions = load_positions(cfg.positions_file, *grid)
    elif cfg.strategy.name == "random":
        positions = select_random(cfg.quota, *grid, seed=cfg.strategy.seed)
    else:
        store = state.kva_store
        if store is None:
            raise LokiError("select needs a KVA store (keep 'analyse' in stages) or "
                            "positions_file=/path/to/positions.json")
        with StoreView(store) as view:
            view.check_grid(*grid)
            positions = select(view.chunks(), cfg.quota, cfg.strategy.name, cfg.strategy.score)
    state.positions = positions
    path = state.output_dir / "positions.json"
    # Every rank selects the same rows; one writes them (two writers race on the temp file).
    state.positions_path = save_positions(positions, path) if is_global_zero() else path
    log.info("select: %s q=%s -> %d rows (%s per layer)", cfg.strategy.name, cfg.quota,
             sum(map(len, positions)), sorted({len(p) for p in positions}))


def implant(state: RunState) -> None:
    callbacks, curve = [], None
    method = methods.get(state.cfg.method.name)
    if curve_wanted(state.cfg) and method.trains:
        # Curves along training: built on the base model, before the method changes it.
        evaluator = (CurveEvaluator(state.cfg, state.loaded, _eval_task(state))
                     if is_global_zero() else None)
        curve = EvalCurve(evaluator, state.cfg.eval.every_n_steps, state.output_dir,
                          method.starts_at_base, state.cfg.eval.curve_steps)
        callbacks.append(curve)
    state.implant = run_implant(state.cfg, state.loaded, state.positions, state.task,
                                state.output_dir, state.loggers, callbacks)
    state.final_point = curve.final_point if curve else None


def _eval_task(state: RunState):
    return state.eval_task or state.task


def evaluate(state: RunState) -> None:
    state.eval_dtype = str(next(state.loaded.model.parameters()).dtype).removeprefix(
        "torch.")
    metrics = run_evaluate(state.cfg, state.loaded, _eval_task(state), state.output_dir,
                           state.final_point)
    state.metrics = metrics
    if state.model_dir:  # the card gets the before/after table
        write_model_card(state.cfg, state.model_dir, state.implant,
                         metrics)
    log_final_metrics(state.loggers, metrics)


def export(state: RunState) -> None:
    state.model_dir = export_checkpoint(state.cfg, state.loaded, state.output_dir)
    if methods.get(state.cfg.method.name).rows_adapter and state.positions:
        state.adapter_dir = save_adapter(
            state.cfg, state.loaded.fingerprint, state.loaded.model, state.positions,
            state.output_dir / "adapter")
    write_model_card(state.cfg, state.model_dir, state.implant)


# Under DDP/FSDP every rank runs analyse, select and implant together; the rest runs once.
RANK_ZERO_STAGES = ("export", "evaluate")

STAGES: dict[str, Callable[[RunState], None]] = {
    "analyse": analyse,
    "select": select_rows,
    "implant": implant,
    "export": export,
    "evaluate": evaluate,
}


def validate(cfg: RunConfig) -> None:
    """What only a stage's inputs can tell (the groups were checked into ``cfg``)."""
    if "implant" in cfg.stages:
        resume_checkpoint(cfg, Path(cfg.paths.output_dir))
    if "implant" in cfg.stages and cfg.trainer.compile and cfg.parallelism.mode == "fsdp2":
        raise LokiError("trainer.compile=true is not available with parallelism fsdp (untested "
                        "with FSDP2's per-layer hooks): set trainer.compile=false or use "
                        "parallelism single or ddp")
    if curve_wanted(cfg) and cfg.parallelism.mode == "fsdp2":
        what = (f"eval.every_n_steps={cfg.eval.every_n_steps}" if cfg.eval.every_n_steps
                else f"eval.curve_steps={cfg.eval.curve_steps}")
        raise LokiError(f"{what} needs the whole model on one process (parallelism single or "
                        "ddp); under fsdp the model is sharded: set eval.every_n_steps=0 and "
                        "eval.curve_steps=[]")


def run(cfg: DictConfig | RunConfig, output_dir: Path) -> RunState:
    """Run the configured stages in order and return what they produced; ``cfg``: a composed
    config (checked here, before any stage) or one ``check_config`` already checked."""
    if not isinstance(cfg, RunConfig):
        cfg = check_config(cfg)
    validate(cfg)
    state = RunState(cfg, output_dir, loggers=build_loggers(cfg, output_dir))
    status = "failed"
    try:
        _run_stages(state)
        status = "success"
    finally:
        close_loggers(state.loggers, status)
    return state


def _run_stages(state: RunState) -> None:
    cfg = state.cfg
    start = time.perf_counter()
    state.loaded = load_model(cfg.model, cfg.paths.cache_dir)
    n_layers, n_nodes = node_grid(state.loaded.model)
    state.timings["load_model"] = time.perf_counter() - start
    if {"implant", "evaluate"} & set(cfg.stages):  # before KVA: a bad dataset fails in seconds
        state.task = load_task(cfg.dataset, cfg.paths.cache_dir, state.loaded.tokenizer)
    scored = "evaluate" in cfg.stages or curve_wanted(cfg)
    if scored and cfg.eval.task_dataset:  # the task scored elsewhere
        state.eval_task = load_task(cfg.eval.task_dataset, cfg.paths.cache_dir,
                                                 state.loaded.tokenizer)
    log.info("model %s: %d layers x %d nodes (base weights: %s)", state.loaded.name, n_layers,
             n_nodes, state.loaded.base_dir)
    for name in cfg.stages:
        if name in RANK_ZERO_STAGES and not is_global_zero():
            continue
        start = time.perf_counter()
        STAGES[name](state)
        state.timings[name] = time.perf_counter() - start
        log.info("stage %-8s done in %.1f s", name, state.timings[name])
    if is_global_zero():
        precision = stage_precisions(state.cfg, state.kva_dtype,
                                     state.eval_dtype)
        write_run_record(state, precision)
        write_summary(state, precision)


def write_summary(state: RunState, precision: dict[str, Any]) -> None:
    """The run's headline measures, stage times and output paths: printed and ``summary.md``."""
    task = _eval_task(state).name if state.task else state.cfg.dataset.name
    lines = summary_lines(state.metrics, task, state.timings,
                          {"run dir": state.output_dir, "model": state.model_dir,
                           "adapter": state.adapter_dir},
                          precision_line(precision),
                          (state.implant or {}).get("data_by_category"))
    atomic.write_text(state.output_dir / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def write_run_record(state: RunState, precision: dict[str, Any]) -> Path:
    """``run.json``: resolved config, where the inputs came from, sizes, stage timings and
    each stage's precision (``precision_record.stage_precisions``)."""
    def path(value: Path | None) -> str | None:
        return str(value) if value else None

    record = {
        "config": state.cfg.record(),
        "base_model_dir": str(state.loaded.base_dir) if state.loaded.base_dir else None,
        "weights_fingerprint": state.loaded.fingerprint,
        "kva_store": path(state.kva_store),
        "positions": path(state.positions_path),
        "model_dir": path(state.model_dir),
        "adapter_dir": path(state.adapter_dir),
        "implant": state.implant,
        "metrics": state.metrics,
        "timings_s": {k: round(v, 3) for k, v in state.timings.items()},
        "precision": precision,
    }
    return atomic.write_json(state.output_dir / "run.json", record, indent=2, default=str)
