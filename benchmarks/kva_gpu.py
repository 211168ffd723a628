"""Published-preset KVA throughput at Llama-3.1-8B shape on one GPU (random weights).

The paper reports 9.69 s per prompt on one RTX 4090 for its 2,850-prompt MMLU probe (7.7
hours). This times our fast engine on the same work: random weights at Llama-3.1-8B shape
(32 layers, d_model 4096, d_ff 14336, 32 heads / 8 KV heads, vocab 128,256, bf16), 2,850
prompts with the token lengths of the probe (the first 50 test rows of the 57 MMLU subjects
rendered in the chat template; a seeded log-normal of the same mean and spread when the
offline assets are not in the cache), ``kva=published`` (zero baseline, last position, left
Riemann x 7, bf16). It prints prompts/s at batch 1 and at each batch size in ``--batches``,
then runs all prompts in probe order at the best batch and prints, last line:

    kva_gpu prompts=<n> batch=<b> total_s=<t> s_per_prompt=<x> batch1_prompts_per_s=<y> best_prompts_per_s=<z>

``--budget-s``: when the whole run would exceed it, it runs the prompts that fit and says
``extrapolated`` (total = measured rate x all prompts). ``--tiny`` runs a 2-layer model on
the CPU to check the script itself.

    python benchmarks/kva_gpu.py [--batches 4 8 16 32] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loki_exp.kva.engine import FastKVA, KVASettings

PUBLISHED = KVASettings(method="riemann_left", steps=7, baseline="zero", scale_positions="last")
PROBE_PROMPTS = 2850
ROOT = Path(__file__).resolve().parents[1]


def probe_lengths(n: int) -> tuple[list[int], str]:
    try:
        from hydra import compose, initialize_config_dir

        from loki_exp.config_check import check_config
        from loki_exp.data.mmlu import ProbeSpec, load_probe, render_prompt
        from loki_exp.models import load_model

        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            tok = load_model(check_config(compose("config", overrides=["model=tiny_llama"]),
                                                 groups=("model",)).model).tokenizer
        items = load_probe(ProbeSpec()).items[:n]
        return ([len(tok(render_prompt(tok, it), add_special_tokens=False).input_ids)
                 for it in items], "the probe's own lengths (SmolLM2 template)")
    except Exception as exc:  # no offline cache on this machine
        rng = np.random.default_rng(0)
        # Measured on the probe: mean 157, sd 81, min 84, max 1079 tokens.
        lengths = np.clip(rng.lognormal(4.937, 0.488, n).round(), 84, 1079).astype(int)
        return lengths.tolist(), f"seeded log-normal (offline probe unavailable: {exc})"


def build_model(tiny: bool, device: str) -> torch.nn.Module:
    shape = (dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1024) if tiny else
             dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256))
    config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False)
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # Buffers (the rotary frequencies) are left empty by the meta device: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model.eval().requires_grad_(False)


def run(engine: FastKVA, prompts: list[torch.Tensor], batch: int, sync) -> float:
    sync()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        engine.attribute_batch(prompts[i:i + batch])
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=PROBE_PROMPTS)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--sample", type=int, default=64, help="prompts timed per batch size")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on the CPU")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = build_model(args.tiny, device)
    lengths, source = probe_lengths(args.prompts)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).to(device) for n in lengths]
    print(f"{device} {torch.cuda.get_device_name() if device == 'cuda' else ''}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"{len(prompts)} prompts, lengths from {source}: mean {np.mean(lengths):.0f}")
    engine = FastKVA(model, PUBLISHED)
    run(engine, prompts[:2], 1, sync)  # warm-up
    sample = prompts[:args.sample]
    rates = {1: len(sample[:16]) / run(engine, sample[:16], 1, sync)}
    print(f"batch 1: {rates[1]:.2f} prompts/s")
    for batch in args.batches:
        try:
            rates[batch] = len(sample) / run(engine, sample, batch, sync)
        except torch.OutOfMemoryError:
            print(f"batch {batch}: out of memory")
            torch.cuda.empty_cache()
            break
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        print(f"batch {batch}: {rates[batch]:.2f} prompts/s (peak {peak:.1f} GiB)")
    best = max(rates, key=rates.get)
    fits = min(len(prompts), max(best, math.floor(rates[best] * args.budget_s)))
    seconds = run(engine, prompts[:fits], best, sync)
    note = ""
    if fits < len(prompts):
        note = f" extrapolated_from={fits}"
        seconds *= len(prompts) / fits
    print(f"kva_gpu prompts={len(prompts)} batch={best} total_s={seconds:.1f} "
          f"s_per_prompt={seconds / len(prompts):.4f} batch1_prompts_per_s={rates[1]:.2f} "
          f"best_prompts_per_s={rates[best]:.2f}{note}")


if __name__ == "__main__":
    main()
