"""Wall time of the default forgetting suite on SmolLM2 (the budget: at most 6 minutes here).

    .venv/bin/python benchmarks/eval_suite_time.py [--limit N] [--model smollm2] [eval overrides]

Scores the base SmolLM2 as the evaluate stage scores a model, part by part: the default
benchmarks through lm-eval (eval.limit questions each), the gold-answer bits per byte
(eval.bpb, as shipped and chat-rendered, eval.bpb_limit items each), the drift questions'
greedy answers and the KL pass (eval.drift_prompts). Prints seconds per part, then
``suite_seconds=`` for the whole (the task metric is timed apart: it depends on the task).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from loki_exp.evaluation.benchmarks import make_lm, run_suite
from loki_exp.evaluation.bpb import score_bpb
from loki_exp.evaluation.drift import answer_logprobs, chat_prompts, drift_questions
from loki_exp.evaluation.task_metric import generate
from loki_exp.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="default: eval.limit")
    parser.add_argument("--model", default="smollm2", help="a conf/model choice")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. eval.bpb_limit=2")
    args = parser.parse_args()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/tmp", f"model={args.model}",
                                           *args.overrides])
    limit = args.limit or cfg.eval.limit
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    ev, cache = cfg.eval, cfg.paths.cache_dir
    lm = make_lm(loaded.model, loaded.tokenizer, int(ev.batch_size))
    total = 0.0

    def timed(label, fn):
        nonlocal total
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        total += seconds
        print(f"{label:22s} {seconds:6.1f} s", flush=True)
        return result

    for task in ev.benchmarks:  # one at a time, to time each
        scores, _ = timed(task, lambda task=task: run_suite(lm, [task], limit, ev.source, cache))
        print(f"{'':22s} acc_norm={scores[task].get('acc_norm', float('nan')):.3f}")
    for name in ev.bpb:
        bpb = timed(f"bpb {name}", lambda name=name: score_bpb(lm, loaded.tokenizer, [name], ev.bpb_limit,
                                                     cache))
        print(f"{'':22s} " + " ".join(f"{k}={sum(v) / len(v):.3f}" for k, v in bpb.items()))
    questions = drift_questions(int(ev.drift_prompts), cache)
    answers = timed("drift answers", lambda: generate(
        loaded.model, loaded.tokenizer, [[{"role": "user", "content": q}] for q in questions],
        int(ev.drift_max_new_tokens), int(ev.batch_size)))
    prompts = chat_prompts(loaded.tokenizer, questions)
    # The KL pass scores the answers under both models: twice the one model's pass.
    timed("drift KL (2 models)", lambda: [answer_logprobs(loaded.model, loaded.tokenizer, prompts,
                                                          answers) for _ in range(2)])
    print(f"suite_seconds={total:.1f} limit={limit} benchmarks={len(ev.benchmarks)} "
          f"bpb_sets={len(ev.bpb)}x2 bpb_limit={ev.bpb_limit} drift_prompts={ev.drift_prompts}")


if __name__ == "__main__":
    main()
