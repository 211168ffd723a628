"""How far two float32 paths to the same KVA scores differ, measured against float64: the
numbers behind ``tests/support/tolerances.py``'s budget.

    .venv/bin/python benchmarks/fp32_path_error.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/fp32_path_error.py

On each tiny decoder type of ``test_a_left_padded_batch_equals_one_prompt_at_a_time`` (three
prompts of different lengths, the published definition, both baselines), the float32 engine
one prompt at a time and in one left-padded batch, each against the float64 engine one prompt
at a time (float64 runs one prompt at a time: Gemma 2's eager masks overflow in float64 batches).
Errors are in float32 eps of the largest float64 score. Last line:

    worst_one_eps=<e> worst_batch_eps=<e> worst_batch_vs_one_eps=<e>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from loki_exp.config_check import check_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support.tiny_decoders: the tiny models the tests use

from loki_exp.kva.engine import FastKVA, KVASettings  # noqa: E402
from loki_exp.models import load_model  # noqa: E402
from tests.support.prompts import mmlu_prompts  # noqa: E402
from tests.support.tiny_decoders import tiny_decoder  # noqa: E402

TYPES = ("llama", "gemma2", "gemma3_text", "olmo2")


def main() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        tokenizer = load_model(check_config(compose("config", overrides=["model=tiny_llama"]),
                                             groups=("model",)).model).tokenizer
    prompts = [p[0] for p in mmlu_prompts(tokenizer, 3)]
    eps = torch.finfo(torch.float32).eps
    worst = {"one": 0.0, "batch": 0.0, "batch_vs_one": 0.0}
    print(f"{torch.get_num_threads()} threads, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for model_type in TYPES:
        for baseline in ("zero", "token"):
            settings = KVASettings(method="riemann_left", steps=7, baseline=baseline,
                                   scale_positions="last")
            fast = FastKVA(tiny_decoder(model_type), settings)
            fast64 = FastKVA(tiny_decoder(model_type).double(), settings)
            for prompt, batched in zip(prompts, fast.attribute_batch(prompts)):
                one = fast(prompt.view(1, -1)).scores.double()
                ref = fast64(prompt.view(1, -1)).scores.double()
                scale = float(ref.abs().max())
                errs = {"one": float((one - ref).abs().max()) / scale / eps,
                        "batch": float((batched.scores.double() - ref).abs().max()) / scale / eps,
                        "batch_vs_one": float((batched.scores.double() - one).abs().max()) / scale / eps}
                worst = {k: max(worst[k], errs[k]) for k in worst}
                print(f"{model_type:12s} {baseline:5s} " + "  ".join(f"{k} {v:6.1f} eps"
                                                                   for k, v in errs.items()))
    print(" ".join(f"worst_{k}_eps={v:.1f}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
