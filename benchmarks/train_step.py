"""Training-step cost on the real SmolLM2-135M: LoKI q=10 vs the original split module,
LoRA r16 and full fine-tuning, batch 4 x 256 tokens, bf16 autocast, AdamW.

Each method runs in its own child process (so peak RSS is its own), one after another,
from this one script run. Last line:

    loki_vs_lora_time=<a> loki_vs_lora_mem=<b> loki_vs_split_time=<c> loki_vs_full_time=<d>

    .venv/bin/python benchmarks/train_step.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import numpy as np
import torch
from torch import nn

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
METHODS = ("loki", "split", "lora", "full")


class SplitLinear(nn.Module):
    """The original LoKI code's module, from its description: an ``active`` Linear for the
    selected rows and a ``frozen`` one for the rest, concatenated and re-ordered by gather."""

    def __init__(self, base: nn.Linear, rows: list[int]):
        super().__init__()
        out = base.out_features
        rows_t = torch.tensor(sorted(rows))
        rest = torch.tensor(sorted(set(range(out)) - set(rows)))
        self.active = nn.Linear(base.in_features, len(rows), bias=False)
        self.frozen = nn.Linear(base.in_features, out - len(rows), bias=False)
        with torch.no_grad():
            self.active.weight.copy_(base.weight[rows_t])
            self.frozen.weight.copy_(base.weight[rest])
        self.frozen.requires_grad_(False)
        self.register_buffer("order", torch.cat([rows_t, rest]).argsort())

    def forward(self, x):
        y = torch.cat([self.active(x), self.frozen(x)], dim=-1)
        return torch.gather(y, -1, self.order.expand(*y.shape[:-1], -1))


def _prepare(method: str, model: nn.Module, positions: list[list[int]]) -> nn.Module:
    from omegaconf import OmegaConf

    from loki_exp.implant import methods

    if method == "split":
        model.requires_grad_(False)
        for block, rows in zip(model.model.layers, positions):
            block.mlp.down_proj = SplitLinear(block.mlp.down_proj, rows)
        return model
    cfg = OmegaConf.create({"name": method, "rank": 16, "alpha": 32, "target_modules": "all-linear"})
    return methods.prepare(cfg, model, positions)


def _child(method: str, steps: int, queue: mp.Queue) -> None:
    from hydra import compose, initialize_config_dir

    from loki_exp.implant.module import CausalLMTuner
    from loki_exp.models import load_model
    from loki_exp.selection import select_layer_balanced

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        loaded = load_model(compose("config", overrides=["model=smollm2"]).model)
    model = loaded.model
    # q=10 rows from random scores: cost does not depend on which rows are chosen.
    scores = np.random.default_rng(0).normal(size=(8, 30, 576))
    model = _prepare(method, model, select_layer_balanced(scores, 10))
    model.train()
    tuner = CausalLMTuner(model, lr=1e-4, max_steps=steps)
    optimizer = tuner.configure_optimizers()["optimizer"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (4, 256), generator=gen)
    labels = ids.clone()
    labels[:, :192] = -100  # loss on the last 64 tokens, like a prompt + response
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = tuner.response_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    queue.put({"method": method, "ms_per_step": 1000 * float(np.median(times)),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "trainable": n_trainable})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for method in METHODS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(method, args.steps, queue))
        proc.start()
        results[method] = queue.get()
        proc.join()
        r = results[method]
        print(f"{method:6s} {r['ms_per_step']:8.0f} ms/step  peak RSS {r['peak_rss_mb']:7.0f} MB  "
              f"trainable {r['trainable']:,}", flush=True)
    loki, lora, split, full = (results[m] for m in ("loki", "lora", "split", "full"))
    print(json.dumps(results))
    print(f"loki_vs_lora_time={loki['ms_per_step'] / lora['ms_per_step']:.3f} "
          f"loki_vs_lora_mem={loki['peak_rss_mb'] / lora['peak_rss_mb']:.3f} "
          f"loki_vs_split_time={loki['ms_per_step'] / split['ms_per_step']:.3f} "
          f"loki_vs_full_time={loki['ms_per_step'] / full['ms_per_step']:.3f}")


if __name__ == "__main__":
    main()
