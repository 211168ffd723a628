"""Training-step cost on the real SmolLM2-135M: LoKI q=10 vs the original split module,
LoRA r16 and full fine-tuning, batch 4 x 256 tokens, bf16 autocast, AdamW.

Each method runs in its own child process (so peak RSS is its own), one after another,
from this one script run. Last line:

    loki_vs_lora_time=<a> loki_vs_lora_mem=<b> loki_vs_split_time=<c> loki_vs_full_time=<d>

    .venv/bin/python benchmarks/train_step.py [--steps 6]

On a GPU: ``--device cuda --arch llama-1b --batch 8 --seq 1024`` runs a random model of
Llama-3.2-1B's shape (no weights needed; cost does not depend on their values) and
reports peak CUDA memory (torch.cuda.max_memory_allocated) instead of RSS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_module
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


def _model(arch: str) -> nn.Module:
    if arch == "smollm2":
        from hydra import compose, initialize_config_dir

        from loki_exp.models import load_model

        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return load_model(compose("config", overrides=["model=smollm2"]).model).model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _child(method: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    from loki_exp.implant.module import CausalLMTuner
    from loki_exp.model_access import node_grid
    from loki_exp.selection import select_layer_balanced

    steps, device = args.steps, torch.device(args.device)
    model = _model(args.arch)
    # q=10 rows from random scores: cost does not depend on which rows are chosen.
    scores = np.random.default_rng(0).normal(size=(8, *node_grid(model)))
    model = _prepare(method, model, select_layer_balanced(scores, 10)).to(device)
    model.train()
    tuner = CausalLMTuner(model, lr=1e-4, max_steps=steps)
    optimizer = tuner.configure_optimizers()["optimizer"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=gen)
    labels = ids.clone()
    labels[:, : args.seq * 3 // 4] = -100  # loss on the last quarter, like prompt + response
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    batch = {k: v.to(device) for k, v in batch.items()}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = tuner.response_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    queue.put({"method": method, "ms_per_step": 1000 * float(np.median(times)),
               "peak_rss_mb": peak, "trainable": n_trainable})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", choices=["smollm2", "llama-1b"], default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for method in METHODS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(method, args, queue))
        proc.start()
        while True:  # a child that dies puts nothing: report it instead of waiting forever
            try:
                results[method] = queue.get(timeout=10)
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    raise SystemExit(f"{method}: child died (exit code {proc.exitcode})") from None
        proc.join()
        r = results[method]
        print(f"{method:6s} {r['ms_per_step']:8.0f} ms/step  peak mem {r['peak_rss_mb']:7.0f} MB  "
              f"trainable {r['trainable']:,}", flush=True)
    loki, lora, split, full = (results[m] for m in ("loki", "lora", "split", "full"))
    print(json.dumps(results))
    print(f"loki_vs_lora_time={loki['ms_per_step'] / lora['ms_per_step']:.3f} "
          f"loki_vs_lora_mem={loki['peak_rss_mb'] / lora['peak_rss_mb']:.3f} "
          f"loki_vs_split_time={loki['ms_per_step'] / split['ms_per_step']:.3f} "
          f"loki_vs_full_time={loki['ms_per_step'] / full['ms_per_step']:.3f}")


if __name__ == "__main__":
    main()
