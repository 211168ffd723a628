"""Wall time of the evaluate stage on SmolLM2, part by part, for the base and a tuned model.

    .venv/bin/python benchmarks/eval_suite_time.py [--limit N] [--model smollm2]
        [--tuned RUN_DIR/model] [--before] [--parts bfcl,drift] [eval overrides, e.g. eval.bpb_limit=2]

Scores each model as the evaluate stage does and prints seconds per part: every benchmark
through lm-eval (eval.limit questions each), the bits-per-byte sets (eval.bpb, as shipped and
chat-rendered), BFCL's generated calls (trained / irrelevance / transfer items; the gold
answers of the held-out items it prompts are scored over its prompt caches, as in the evaluate
stage), the task's gold-answer bits per byte of the other held-out items (its achieved FLOP/s
and the fraction of the matmul peak of the model's own shapes, ``benchmarks/peak.py``), the
drift answers and the KL pass. With ``--before`` the parts this code changed are also timed
the way they ran before, in the same process on the same items: BFCL's generation through
transformers' ``generate``, each batch run until its last row ends (now: a row leaves its
batch when it ends or its score is settled, ``loki_exp/evaluation/greedy.py``; every item's
score must be the same and each text the start of the old one) and the KL pass loading the
base model again (now: the base model loaded once per evaluation), and the benchmarks and
bits-per-byte sets through lm-eval's own loop (one sequence per request; now: each shared
context once, ``loki_exp/evaluation/loglikelihood.py``; the per-item scores must be equal, the
bits per byte equal to float rounding) and the gold bits per byte of every item here, each run
from its first token (now: the items' shared prefix once, and the generated items' from the
generation's caches; equal to float rounding). So "BFCL generation" now includes scoring those
gold answers and "task gold bpb" covers the other items: compare their sum with the sum of the
two "(before)" lines. Last line:

    suite_seconds=<base, all parts> tuned_seconds=<...> limit=... benchmarks=... bpb_sets=...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from hydra import compose, initialize_config_dir
from lm_eval.models.huggingface import HFLM

from loki_exp.config_check import check_config
from loki_exp.data.tasks import load_task
from loki_exp.evaluation import gold_bpb as gold_bpb_module
from loki_exp.evaluation import task_metric
from loki_exp.evaluation.bpb import score_bpb
from loki_exp.evaluation.drift import answer_logprobs, chat_prompts, drift_questions
from loki_exp.evaluation.evaluate import task_heldout
from loki_exp.evaluation.gold_bpb import encode_gold, gold_bpb
from loki_exp.evaluation.greedy import generate_batches
from loki_exp.evaluation.suite import make_lm, run_suite
from loki_exp.evaluation.task_metric import bfcl_accuracy, bfcl_correct, bfcl_heldout, generate
from loki_exp.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/peak.py
from peak import count_flops, linear_shapes, matmul_peak  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.total = 0.0

    def __call__(self, label, fn, count=True):
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        if count:
            self.total += seconds
        print(f"{label:34s} {seconds:7.1f} s", flush=True)
        return result


def generate_before(model, tokenizer, conversations, max_new_tokens, batch_tokens) -> list[str]:
    """Generation as it ran before: transformers' ``generate`` on each batch of whole prompts
    (``length_batches``), every row run until the batch's last one ends, none settled early;
    the rest is today's ``generate``."""
    def whole_batches(model, batches, max_new_tokens, eos_id, settled=None, prefix=None,
                      forced=None):
        return generate_batches(model, batches, max_new_tokens, eos_id)

    with mock.patch.object(task_metric, "prefix_cache", lambda model, prefix: None), \
            mock.patch.object(task_metric, "greedy_decode", whole_batches):
        return task_metric.generate(model, tokenizer, conversations, max_new_tokens, batch_tokens)


PARTS = ("benchmarks", "bpb", "gold", "bfcl", "drift")


def score(name, model, tokenizer, cfg, task, limit, before, parts=PARTS, base_model=None
          ) -> float:
    ev, cache = cfg.eval, cfg.paths.cache_dir
    clock = Clock()
    print(f"-- {name}")
    lm = make_lm(model, tokenizer, ev.batch_size)
    own = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=ev.batch_size,
               device=str(next(model.parameters()).device)) if before else None
    for bench in ev.benchmarks if "benchmarks" in parts else ():  # one at a time, to time each
        scores, items = clock(bench, lambda bench=bench: run_suite(lm, [bench], limit, ev.source,
                                                                   cache))
        print(f"{'':34s} acc_norm={scores[bench].get('acc_norm', float('nan')):.3f}")
        if own is not None:
            start = time.perf_counter()
            _, old = run_suite(own, [bench], limit, ev.source, cache)
            print(f"{bench + ' (before)':34s} {time.perf_counter() - start:7.1f} s  "
                  f"same items: {old == items}", flush=True)
    for set_name in ev.bpb if "bpb" in parts else ():
        bpb = clock(f"bpb {set_name}", lambda s=set_name: score_bpb(lm, tokenizer, [s], ev.bpb_limit,
                                                                    cache))
        print(f"{'':34s} " + " ".join(f"{k}={sum(v) / len(v):.3f}" for k, v in bpb.items()))
        if own is not None:
            start = time.perf_counter()
            old = score_bpb(own, tokenizer, [set_name], ev.bpb_limit, cache)
            diff = max(abs(a - b) / abs(b) for k in bpb for a, b in zip(bpb[k], old[k]))
            print(f"{'bpb ' + set_name + ' (before)':34s} {time.perf_counter() - start:7.1f} s  "
                  f"max_rel_diff={diff:.2g}", flush=True)
    # BFCL's generation first, as the evaluate stage runs it: the gold answers of the held-out
    # items it prompts are scored over its prompt caches, and gold bpb runs only the others.
    heldout = task_heldout(task, ev.task_bpb_items) if "gold" in parts else []
    gold_nll: dict[str, float] = {}
    counts = {"trained": ev.bfcl_trained_items, "irrelevance": ev.bfcl_irrelevance_items,
              "transfer": ev.bfcl_transfer_items}
    if "bfcl" in parts and task.name == "bfcl" and any(counts.values()):
        items = [item for by_cat in bfcl_heldout(list(task.categories), task.test_fraction,
                                                  counts, cache).values()
                 for cat_items in by_cat.values() for item in cat_items]
        conversations = [i.messages for i in items]
        gold_in = {i.id: encode_gold(tokenizer, i) for i in heldout}
        accuracy, rows = clock(f"BFCL generation ({len(items)} items)", lambda: bfcl_accuracy(
            model, tokenizer, items, ev.max_new_tokens, ev.generation_batch_tokens, gold_in))
        gold_nll = {r["id"]: r["gold_nll"] for r in rows if "gold_nll" in r}
        texts = [r["generated"] for r in rows]
        print(f"{'':34s} correct={accuracy:.3f} (trained and irrelevance items together), "
              f"gold answers scored over its prompts: {len(gold_nll)}")
        if before:
            start = time.perf_counter()
            old = generate_before(model, tokenizer, conversations, ev.max_new_tokens,
                                  ev.generation_batch_tokens)
            seconds = time.perf_counter() - start
            same = [bfcl_correct(t, i) for t, i in zip(old, items)] == [r["correct"] for r in rows]
            print(f"{'BFCL generation (before)':34s} {seconds:7.1f} s  same scores: {same}  "
                  f"texts the start of the old: {all(o.startswith(t) for o, t in zip(old, texts))}"
                  f"  settled early: {sum(o != t for o, t in zip(old, texts))}", flush=True)
    if "gold" in parts:
        gold = clock(f"task gold bpb ({len(heldout) - len(gold_nll)} of {len(heldout)} items)",
                     lambda: gold_bpb(model, tokenizer, heldout, ev.batch_size, gold_nll))
        flops = count_flops(lambda: gold_bpb(model, tokenizer, heldout[:16], ev.batch_size))
        start = time.perf_counter()
        gold_bpb(model, tokenizer, heldout[:16], ev.batch_size)
        rate = flops / (time.perf_counter() - start)
        sample = [len(encode_gold(tokenizer, i)["input_ids"]) for i in heldout[:16]]
        tokens = ev.batch_size * sum(sample) // len(sample)  # one batch of gold_bpb's
        peak = matmul_peak(linear_shapes(model, tokens), next(model.parameters()).dtype)
        print(f"{'':34s} gold_bpb={sum(gold) / len(gold):.4f} gold_bpb_gflops={rate / 1e9:.1f} "
              f"peak_gflops={peak / 1e9:.1f} gold_bpb_peak_fraction={rate / peak:.3g}")
        if before:  # every item here, from the start of its prompt: no shared prefix
            start = time.perf_counter()
            with mock.patch.object(gold_bpb_module, "shared_prefix", lambda **batch: 0):
                old = gold_bpb(model, tokenizer, heldout, ev.batch_size)
            diff = max(abs(a - b) / abs(b) for a, b in zip(gold, old))
            print(f"{'task gold bpb (before)':34s} {time.perf_counter() - start:7.1f} s  "
                  f"max_rel_diff={diff:.2g}", flush=True)
    if "drift" in parts:
        questions = drift_questions(ev.drift_prompts, cache)
        answers = clock("drift answers", lambda: generate(
            model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
            ev.drift_max_new_tokens, ev.generation_batch_tokens))
        prompts = chat_prompts(tokenizer, questions)
        if base_model is not None:  # a tuned model: KL against the base on the base's answers
            answers = generate(base_model, tokenizer, [[{"role": "user", "content": q}]
                                                       for q in questions],
                               ev.drift_max_new_tokens, ev.generation_batch_tokens)
            clock("drift KL (base loaded once)", lambda: [answer_logprobs(m, tokenizer, prompts, answers)
                                                          for m in (base_model, model)])
            if before:
                def reload():
                    again = load_model(cfg.model, cache).model
                    return [answer_logprobs(m, tokenizer, prompts, answers) for m in (again, model)]
                clock("drift KL, base loaded again (before)", reload, count=False)
    return clock.total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="default: eval.limit")
    parser.add_argument("--model", default="smollm2", help="a conf/model choice")
    parser.add_argument("--tuned", default=None, help="an exported model dir to time as well")
    parser.add_argument("--before", action="store_true",
                        help="also time the changed parts as they ran before")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to time, of {','.join(PARTS)}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. eval.bpb_limit=2")
    args = parser.parse_args()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = check_config(compose("config", overrides=["paths.output_dir=/tmp",
                                                         f"model={args.model}", *args.overrides]))
    limit = args.limit or cfg.eval.limit
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"--parts: {sorted(set(parts) - set(PARTS))} are not parts; expected some of {PARTS}")
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    task = load_task(cfg.dataset, cfg.paths.cache_dir, loaded.tokenizer)
    print(f"{loaded.name}, {torch.get_num_threads()} threads, {next(loaded.model.parameters()).dtype}")
    base_seconds = score("base", loaded.model, loaded.tokenizer, cfg, task, limit, args.before,
                         parts)
    tuned_seconds = 0.0
    if args.tuned:
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(args.tuned).eval()
        tuned_seconds = score("tuned", tuned, loaded.tokenizer, cfg, task, limit, args.before,
                              parts, base_model=loaded.model)
    ev = cfg.eval
    print(f"suite_seconds={base_seconds:.1f} tuned_seconds={tuned_seconds:.1f} limit={limit} "
          f"benchmarks={len(ev.benchmarks)} bpb_sets={len(ev.bpb)}x2 bpb_limit={ev.bpb_limit} "
          f"drift_prompts={ev.drift_prompts}")


if __name__ == "__main__":
    main()
