"""KVA's settings (the quadrature, baseline, positions scaled and engine), checked where they
are built, and the result of one prompt's attribution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loki_exp.errors import LokiError
from loki_exp.upstream import captum_quadrature

if TYPE_CHECKING:  # the settings are checked with the config, before torch is needed
    import torch

BASELINES = ("zero", "token")
SCALE_POSITIONS = ("all", "last")
ENGINES = ("fast", "captum")


@dataclass(frozen=True)
class KVASettings:
    method: str = "riemann_trapezoid"
    steps: int = 7
    baseline: str = "zero"
    baseline_token_id: int = 0
    scale_positions: str = "all"
    engine: str = "fast"

    def __post_init__(self) -> None:
        supported, _ = captum_quadrature()
        if self.method not in supported:
            raise LokiError(f"kva.method={self.method!r} is not known; expected one of "
                            f"{supported}")
        min_steps = 1 if self.method == "gausslegendre" else 2
        if not isinstance(self.steps, int) or self.steps < min_steps:
            raise LokiError(f"kva.steps={self.steps!r} must be an integer >= {min_steps} "
                            f"for {self.method}")
        if self.baseline not in BASELINES:
            raise LokiError(f"kva.baseline={self.baseline!r} is not known; expected one of "
                            f"{list(BASELINES)}")
        if self.scale_positions not in SCALE_POSITIONS:
            raise LokiError(f"kva.scale_positions={self.scale_positions!r} is not known; "
                            f"expected one of {list(SCALE_POSITIONS)}")
        if self.engine not in ENGINES:
            raise LokiError(f"kva.engine={self.engine!r} is not known; expected one of "
                            f"{list(ENGINES)}")
        if self.engine == "captum" and self.scale_positions != "all":
            raise LokiError("kva.engine=captum implements only scale_positions=all")

    def quadrature(self) -> tuple[list[float], list[float]]:
        """Captum's integration points and weights (not re-derived: see docs/method.md)."""
        step_sizes, alphas = captum_quadrature()[1](self.method)
        return list(alphas(self.steps)), list(step_sizes(self.steps))


@dataclass
class Attribution:
    scores: torch.Tensor  # [L, D] float32
    target_token: int
    target_prob: float
