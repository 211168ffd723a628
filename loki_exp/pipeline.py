"""The stage sequence of one run: analyse -> select -> implant -> evaluate -> export.

Each stage is a function of the composed config and a shared ``RunState``; stages that are
not built yet say so instead of pretending to run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from loki_exp.errors import LokiError
from loki_exp.model_access import node_grid
from loki_exp.models import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass
class RunState:
    cfg: DictConfig
    output_dir: Path
    loaded: LoadedModel | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    not_built: list[str] = field(default_factory=list)


def _not_built(issue: str) -> Callable[[RunState], None]:
    def stage(state: RunState) -> None:
        raise NotImplementedError(issue)

    return stage


def analyse(state: RunState) -> None:
    from loki_exp.kva.analyse import run_analyse

    state.artifacts["kva_store"] = run_analyse(state.cfg, state.loaded)


STAGES: dict[str, Callable[[RunState], None]] = {
    "analyse": analyse,
    "select": _not_built("node selection (issue #4)"),
    "implant": _not_built("LoKI training (issue #4)"),
    "evaluate": _not_built("forgetting suite and task metric (issue #5)"),
    "export": _not_built("restore and export (issue #4)"),
}


def validate(cfg: DictConfig) -> None:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise LokiError(f"stages={list(cfg.stages)} has unknown entries {unknown}; "
                        f"expected a subset of {list(STAGES)}")
    q = cfg.quota
    if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0 < q <= 100:
        raise LokiError(f"quota={q!r} is out of range; expected a number in (0, 100]")


def run(cfg: DictConfig, output_dir: Path) -> RunState:
    """Run the configured stages in order and return what they produced."""
    validate(cfg)
    state = RunState(cfg, output_dir)
    start = time.perf_counter()
    state.loaded = load_model(cfg.model, cfg.paths.cache_dir)
    n_layers, n_nodes = node_grid(state.loaded.model)
    state.timings["load_model"] = time.perf_counter() - start
    log.info("model %s: %d layers x %d nodes (base weights: %s)", state.loaded.name, n_layers,
             n_nodes, state.loaded.base_dir)
    for name in cfg.stages:
        start = time.perf_counter()
        try:
            STAGES[name](state)
        except NotImplementedError as missing:
            state.not_built.append(name)
            log.warning("stage %-8s not built yet: %s", name, missing)
            continue
        state.timings[name] = time.perf_counter() - start
        log.info("stage %-8s done in %.1f s", name, state.timings[name])
    return state
