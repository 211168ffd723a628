"""Evaluation along training: task against forgetting at step 0 and every N steps.

``eval.every_n_steps`` (0: off) and ``eval.curve_steps`` (more steps, e.g. early ones where the
gain moves fastest) add ``EvalCurve`` to the implant stage's Trainer. At each
point it evaluates the measures that need no generation, on the same items as the evaluate
stage: the task's gold-answer bits per byte, the forgetting suite's bits-per-byte sets and
the KL drift on the base model's own answers. A point's metrics carry the evaluate stage's
names and intervals (``task/bfcl/gold_bpb/reduction_pct``, ``drift/kl/after``,
``forgetting/avg_bpb``...). Neither end is measured twice: a method that starts at the base's
function (``Method.starts_at_base``) gets the base's scores as its step-0 point, and the
evaluate stage takes those measures from the point at the last step (``final_point``).

Records: ``curve.jsonl`` in the run dir, rewritten whole at every point (never half a line):
first the base model's per-item values (``{"model": "base", "items": ...}``), then one line
per point (``{"model": "tuned", "step", "seconds", "metrics", "items"}``); the report draws
and compares curves from them (``loki_exp.report``). The loggers get each point as
``curve/<metric>`` at its step (README "Curves along training": the W&B panel).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L

from loki_exp import atomic
from loki_exp.data.tasks import TaskData
from loki_exp.evaluation.curve_records import FILE, read_records
from loki_exp.evaluation.drift import answer_logprobs, chat_prompts, drift_questions, kl_per_item
from loki_exp.evaluation.evaluate import BaseModel, base_cheap_scores, flat_metrics, score_cheap
from loki_exp.implant.compiled import eager_layers
from loki_exp.models import LoadedModel

if TYPE_CHECKING:
    from loki_exp.config_schema import RunConfig

log = logging.getLogger(__name__)

# A curve point's measures: the base items they are paired with.
CHEAP_PREFIXES = ("task/", "bpb/")


class CurveEvaluator:
    """Built before the method prepares the model (it is the base model then): the base's
    scores that need no generation and its drift answers (cached, and the part of the
    evaluate stage's base scores that it reuses), and the base's log-probabilities on those
    answers, kept in memory for the KL of every point."""

    def __init__(self, cfg: RunConfig, loaded: LoadedModel, task: TaskData):
        self.cfg, self.task, self.tokenizer = cfg, task, loaded.tokenizer
        base = base_cheap_scores(cfg, loaded, task, BaseModel(cfg, loaded))
        gold = f"task/{task.name}/gold_bpb"
        self.base = {"task": {"gold_bpb": base["task"]["gold_bpb"]}, "bench": {},
                     "bpb": base["bpb"],
                     "items": {k: v for k, v in base["items"].items()
                               if k == gold or k.startswith("bpb/")}}
        self.answers = base.get("drift", {}).get("answers") or []
        self.prompts = chat_prompts(loaded.tokenizer, drift_questions(len(self.answers),
                                                                      cfg.paths.cache_dir))
        self.base_logprobs = answer_logprobs(loaded.model, loaded.tokenizer, self.prompts,
                                             self.answers) if self.answers else []

    def base_point(self) -> dict[str, Any]:
        """The step-0 point of a method that starts at the base model's function: the base's
        own items (KL 0), read instead of measured (the evaluations are deterministic)."""
        items = dict(self.base["items"])
        if self.answers:
            items["drift/kl"] = [0.0] * len(self.answers)
        return {"metrics": self._metrics({**self.base, "items": items}), "items": items}

    def measure(self, model) -> dict[str, Any]:
        """One point: metrics (as the evaluate stage names them) and per-item values. The
        model goes back to the mode it was in (lm-eval's wrapper switches it to eval)."""
        was_training = model.training
        model.eval()
        # trainer.compile: uncompiled here, generation's caches would compile a graph per layer
        with eager_layers(model):
            try:
                after = score_cheap(self.cfg, model, self.tokenizer, self.task)
                if self.answers:
                    after["items"]["drift/kl"] = kl_per_item(
                        self.base_logprobs, answer_logprobs(model, self.tokenizer, self.prompts,
                                                            self.answers))
            finally:
                model.train(was_training)
        after["bench"] = {}
        return {"metrics": self._metrics(after), "items": after["items"]}

    def _metrics(self, after: dict[str, Any]) -> dict[str, float]:
        metrics = flat_metrics(self.task.name, self.base, after, self.cfg.eval.forgetting_metric)
        # forgetting/avg here would be the bits-per-byte sets alone: named avg_bpb instead.
        return {k: v for k, v in metrics.items() if not k.startswith(("forgetting/avg/",))
                and k != "forgetting/avg"}


class EvalCurve(L.Callback):
    """A point at the first step, every ``every_n_steps`` optimizer steps (0: none), at each
    of ``steps`` and at the last step.
    Under DDP rank 0 evaluates (its ``evaluator``) while the other ranks wait; the run is
    refused under FSDP2, whose model is sharded across ranks (``pipeline.validate``)."""

    def __init__(self, evaluator: CurveEvaluator | None, every_n_steps: int, output_dir: Path,
                 starts_at_base: bool = False, steps: list[int] = ()):
        self.evaluator = evaluator
        self.every = every_n_steps
        self.steps = set(steps)
        self.starts_at_base = starts_at_base  # step 0 is the base's scores (Method.starts_at_base)
        self.path = Path(output_dir) / FILE
        self.last_step: int | None = None
        self.records: list[dict[str, Any]] = []
        self.final_point: dict[str, Any] | None = None  # the point at the step training ended

    def on_train_start(self, trainer, pl_module) -> None:
        if self.evaluator is not None:
            self.records = read_records(self.path) if self.path.exists() else []
            if not self.records:
                self.records = [{"model": "base", "items": self.evaluator.base["items"]}]
            # A resumed run keeps the points it already has, up to its checkpoint's step.
            self.records = [r for r in self.records if r.get("step") is None
                            or r["step"] < trainer.global_step]
        self._point(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (self.every and step % self.every == 0) or step in self.steps:
            self._point(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._point(trainer, pl_module)
        if self.records and self.records[-1].get("step") == trainer.global_step:
            self.final_point = self.records[-1]

    def _point(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return
        self.last_step = step
        if self.evaluator is not None:
            start = time.perf_counter()
            from_base = step == 0 and self.starts_at_base
            point = (self.evaluator.base_point() if from_base
                     else self.evaluator.measure(pl_module.model))
            seconds = time.perf_counter() - start
            self.records.append({"model": "tuned", "step": step, "seconds": round(seconds, 3),
                                 **({"from": "base"} if from_base else {}), **point})
            atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
            for lg in trainer.loggers:
                lg.log_metrics({f"curve/{k}": v for k, v in point["metrics"].items()}, step=step)
            m = point["metrics"]
            task = self.evaluator.task.name
            log.info("curve point at step %d in %.1f s: gold bpb %.4f (%.1f%% below base), KL "
                     "%.4g, Avg bpb forgetting %.3g%%", step, seconds,
                     m.get(f"task/{task}/gold_bpb/after", float("nan")),
                     m.get(f"task/{task}/gold_bpb/reduction_pct", float("nan")),
                     m.get("drift/kl/after", float("nan")), m.get("forgetting/avg_bpb", float("nan")))
        if trainer.world_size > 1:
            trainer.strategy.barrier("eval_curve")


def curve_wanted(cfg: RunConfig) -> bool:
    """Whether the config asks for a curve (``eval.every_n_steps`` or ``eval.curve_steps``)."""
    return bool(cfg.eval.every_n_steps or cfg.eval.curve_steps)


