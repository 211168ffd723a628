"""Wall time of the default forgetting suite on SmolLM2 (the budget: at most 5 minutes here).

    .venv/bin/python benchmarks/eval_suite_time.py [--limit N]

Scores the base SmolLM2 on the six default benchmarks through lm-eval, eval.limit
questions each, and prints seconds per benchmark, the total and the scores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from loki_exp.evaluation.benchmarks import run_suite
from loki_exp.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="default: eval.limit")
    args = parser.parse_args()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/tmp"])
    limit = args.limit or cfg.eval.limit
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    total, scores = 0.0, {}
    for task in cfg.eval.benchmarks:  # one at a time, to time each
        start = time.perf_counter()
        scores.update(run_suite(loaded.model, loaded.tokenizer, [task], limit,
                                int(cfg.eval.batch_size), cfg.eval.source, cfg.paths.cache_dir))
        seconds = time.perf_counter() - start
        total += seconds
        print(f"{task:15s} {seconds:6.1f} s  acc_norm={scores[task].get('acc_norm', float('nan')):.3f}")
    print(f"suite_seconds={total:.1f} limit={limit} benchmarks={len(cfg.eval.benchmarks)}")


if __name__ == "__main__":
    main()
