"""A training step on real task batches with the batch's shared prefix run once, against the
same step run in one pass (``loki_exp/implant/module.py``: ``ResponseLM``).

SmolLM2 with LoKI q=10 on random rows (which rows does not change the cost) and the first
``--batches`` global batches that ``experiment=cpu_demo`` trains on (BFCL, grouped by length,
batch 4: every row starts with the same system prompt). Like with like: one model, the
same batches, forward + backward of the loss (the optimizer step is the same on both sides
and left out), the two sides interleaved in every repeat. Also checked: the same loss and
gradients. Last line:

    shared_prefix_speedup=<median over repeats of one-pass s / shared s> [<min>, <max>]
        shared_tokens=<mean prefix per batch> tokens_per_batch=<mean> max_rel_grad_diff=...

    .venv/bin/python benchmarks/shared_prefix_step.py [--batches 8 --repeats 3] [overrides]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from loki_exp.config_check import check_config
from loki_exp.data.sft import GlobalBatchSampler, PadCollator, encode_all, pad_id, shared_prefix
from loki_exp.data.tasks import load_task
from loki_exp.implant.loki_linear import apply_loki
from loki_exp.implant.module import ResponseLM
from loki_exp.model_access import node_grid
from loki_exp.models import load_model
from loki_exp.selection import select_random

ROOT = Path(__file__).resolve().parents[1]


def step(lm: ResponseLM, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    lm.model.zero_grad(set_to_none=True)
    total, count = lm(batch["input_ids"], batch["attention_mask"], batch["labels"])
    (total / count).backward()
    return float(total.detach()), {n: p.grad for n, p in lm.model.named_parameters()
                                   if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default experiment=cpu_demo)")
    args = parser.parse_args()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = check_config(compose("config", overrides=["paths.output_dir=/tmp",
                                                         *(args.overrides or ["experiment=cpu_demo"])]))
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    task = load_task(cfg.dataset, cfg.paths.cache_dir, loaded.tokenizer)
    train, _ = encode_all(loaded.tokenizer, task.train, cfg.dataset.max_length, cfg.dataset.overflow)
    sampler = GlobalBatchSampler(len(train), cfg.trainer.batch_size, seed=cfg.seed,
                                 lengths=[len(r["input_ids"]) for r in train])
    collate = PadCollator(pad_id(loaded.tokenizer))
    batches = [collate([train[i] for i in b]) for b in sampler.global_batches()[:args.batches]]
    model = loaded.model.train()
    apply_loki(model, select_random(10, *node_grid(model), seed=0))
    lm = ResponseLM(model)
    shared = [shared_prefix(b["input_ids"], b["attention_mask"], b["labels"]) for b in batches]
    sides = {True: [], False: []}
    worst = 0.0
    for repeat in range(args.repeats):
        for share in ((True, False) if repeat % 2 == 0 else (False, True)):
            lm.share_prefix = share
            start = time.perf_counter()
            for batch in batches:
                step(lm, batch)
            sides[share].append(time.perf_counter() - start)
    for batch in batches:  # the same loss and gradients, batch by batch
        lm.share_prefix = True
        loss, grads = step(lm, batch)
        grads = {n: g.clone() for n, g in grads.items()}
        lm.share_prefix = False
        want, want_grads = step(lm, batch)
        assert abs(loss - want) <= 1e-4 * abs(want), (loss, want)
        worst = max(worst, *(float((grads[n] - g).abs().max() / g.abs().max())
                             for n, g in want_grads.items()))
    ratios = np.array(sides[False]) / np.array(sides[True])
    print(f"{loaded.name}, {torch.get_num_threads()} threads, {len(batches)} batches of "
          f"{cfg.trainer.batch_size}: one pass {np.median(sides[False]):.2f} s, shared prefix "
          f"{np.median(sides[True]):.2f} s (forward + backward, medians of {args.repeats})")
    tokens = np.mean([int(b["attention_mask"].sum()) for b in batches])
    print(f"shared_prefix_speedup={np.median(ratios):.3f} [{ratios.min():.3f}, {ratios.max():.3f}] "
          f"shared_tokens={np.mean(shared):.1f} tokens_per_batch={tokens:.0f} "
          f"max_rel_grad_diff={worst:.2g}")


if __name__ == "__main__":
    main()
