"""KVA speed on the real SmolLM2-135M-Instruct: each fast path against the reference it must equal.

Runs every side in one process on the same MMLU probe prompts (fp32), side by side prompt by
prompt with the order rotating (the peak is timed once, before them), and prints, last line:

    kva_speedup_exact=<x> max_rel_err=<e> published_speedup=<y> published_max_rel_err=<f>
        published_peak_fraction=<p> exact_peak_fraction=<q> captum_peak_fraction=<r>
        captum_flop_ratio=<n>

x: Captum per-layer reference time / fast engine time on the all-positions definition
(``--method``, ``--steps``, ``--baseline``); e: max over prompts of max|fast - ref| / max|ref|.
y: time of the first commit's algorithm as that code ran it (``kva/first_commit.py``: per
layer, a hook on down_proj and a batch of m full-length copies) / the fast engine's time on
the same quantity (``kva=published``: zero baseline, last position, left Riemann x 7);
f: the same error measure between those two. Also on that line: ``published_peak_fraction``,
the fast published path's achieved FLOP/s (its matmul and attention FLOPs per prompt, forward
and backward, counted by torch's FlopCounterMode) over the FLOP/s of ``torch.matmul`` on the
model's own Linear shapes at the prompts' mean length, in the model's dtype, timed in this process
(``benchmarks/peak.py``). q and r: the same for the exact engine and the Captum reference on
the all-positions definition; n: the reference's FLOPs over the engine's, so x = n * q / r:
the speedup the FLOPs allow at equal efficiency, and what each side's efficiency adds. Each
fast engine's construction (its self-check, ``FastKVA.self_check``, once per engine, outside
the timed prompts) is printed with its seconds.

    .venv/bin/python benchmarks/kva_speed.py --prompts 3 [--baseline zero|token] [--skip-captum]
        [--model smollm2] [--all-logits]

``--presets`` instead times each KVA preset (``kva=published|reference_captum|paper_text``),
one after another, as the analyse stage runs it (the preset's engine settings and compute
dtype, on its own copy of the model), on the same prompts, and prints one ``preset=...`` line
each; the published preset also in fp32 (the CPU experiments run it so).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from loki_exp.config_check import check_config
from loki_exp.data.mmlu import ProbeSpec, load_probe, render_prompt
from loki_exp.kva.engine import CaptumKVA, FastKVA, KVASettings
from loki_exp.kva.first_commit import first_commit_kva
from loki_exp.kva.lightning import common_prefix
from loki_exp.kva.stage import kva_settings, model_for_kva
from loki_exp.models import load_model, torch_dtype
from loki_exp.selection import select_layer_balanced

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/peak.py
from peak import count_flops, linear_shapes, matmul_peak  # noqa: E402

PUBLISHED = KVASettings(method="riemann_left", steps=7, baseline="zero", scale_positions="last")

ROOT = Path(__file__).resolve().parents[1]


def timed(engine, prompts):
    out, start = [], time.perf_counter()
    for ids in prompts:
        out.append(engine(ids))
    return out, time.perf_counter() - start


def timed_side_by_side(sides: dict, prompts) -> tuple[dict[str, list], dict[str, float]]:
    """Each prompt through every side before the next prompt, the order rotating from prompt to
    prompt: this machine's speed drifts by up to a third within minutes, and sides timed one
    after another would carry that drift into their ratio."""
    names = list(sides)
    out = {name: [] for name in names}
    seconds = {name: 0.0 for name in names}
    for i, ids in enumerate(prompts):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            out[name].append(sides[name](ids))
            seconds[name] += time.perf_counter() - start
    return out, seconds


def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    shared = sum(len(set(x) & set(y)) for x, y in zip(a, b))
    return shared / sum(len(x) for x in a)


def time_presets(n_prompts: int, model: str) -> None:
    runs = [("published", []), ("published", ["kva.dtype=float32"]), ("reference_captum", []),
            ("paper_text", [])]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfgs = [(name, check_config(compose("config",
                                            overrides=[f"model={model}", f"kva={name}", *extra]),
                                    groups=("model", "kva")))
                for name, extra in runs]
    loaded = load_model(cfgs[0][1].model)
    tok = loaded.tokenizer
    items = load_probe(ProbeSpec(samples_per_subject=1, limit=n_prompts)).items
    prompts = [tok(render_prompt(tok, it), return_tensors="pt", add_special_tokens=False).input_ids
               for it in items]
    prefix = torch.tensor(common_prefix([p[0].tolist() for p in prompts]))
    print(f"{loaded.name}, {torch.get_num_threads()} threads, {len(prompts)} prompts of "
          f"{[p.shape[1] for p in prompts]} tokens")
    for name, cfg in cfgs:
        dtype = cfg.kva.dtype or "float32"  # null: as loaded (SmolLM2 loads in fp32)
        engine = FastKVA(model_for_kva(loaded.model, torch_dtype(dtype)), kva_settings(cfg.kva))
        engine.set_shared_prefix(prefix)
        _, seconds = timed(engine, prompts)
        print(f"preset={name} dtype={dtype} s_per_prompt={seconds / len(prompts):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--baseline", default="zero", choices=["zero", "token"])
    parser.add_argument("--method", default="riemann_trapezoid")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--skip-captum", action="store_true", help="time the fast paths only")
    parser.add_argument("--presets", action="store_true", help="time each KVA preset instead")
    parser.add_argument("--model", default="smollm2", help="a conf/model choice")
    parser.add_argument("--all-logits", action="store_true",
                        help="also time the Captum reference computing logits at every position, "
                             "as it did before a90620d (the ratio 5.61 was measured against it)")
    args = parser.parse_args()
    if args.presets:
        time_presets(args.prompts, args.model)
        return

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        loaded = load_model(check_config(compose("config", overrides=[f"model={args.model}"]),
                                             groups=("model",)).model)
    tok = loaded.tokenizer
    items = load_probe(ProbeSpec(limit=args.prompts)).items
    prompts = [tok(render_prompt(tok, it), return_tensors="pt", add_special_tokens=False).input_ids
               for it in items]
    print(f"{loaded.name} fp32, {torch.get_num_threads()} threads, {len(prompts)} prompts of "
          f"{[p.shape[1] for p in prompts]} tokens, {args.method} x {args.steps}, "
          f"baseline={args.baseline}")

    # The published quantity: the fast engine vs the first commit's algorithm.
    start = time.perf_counter()
    published = FastKVA(loaded.model, PUBLISHED)
    print(f"fast published     : built and self-checked in {time.perf_counter() - start:.2f} s")
    out, seconds = timed_side_by_side(
        {"fast": published,
         "first": lambda ids: first_commit_kva(loaded.model, ids, PUBLISHED.steps)}, prompts)
    (fast_pub, t_pub), (first, t_first) = ((out[k], seconds[k]) for k in ("fast", "first"))
    print(f"fast published     : {t_pub / len(prompts):7.2f} s/prompt")
    print(f"first-commit code  : {t_first / len(prompts):7.2f} s/prompt")
    assert all(a.target_token == target for a, (_, target) in zip(fast_pub, first))
    pub_err = max(rel_err(a.scores, ref) for a, (ref, _) in zip(fast_pub, first))
    flops = sum(count_flops(lambda ids=ids: published(ids)) for ids in prompts)
    tokens = int(np.mean([p.shape[1] for p in prompts]))
    peak = matmul_peak(linear_shapes(loaded.model, tokens), next(loaded.model.parameters()).dtype)
    print(f"fast published     : {flops / len(prompts) / 1e9:7.1f} GFLOP/prompt, "
          f"{flops / t_pub / 1e9:.1f} GFLOP/s; matmul peak {peak / 1e9:.1f} GFLOP/s")
    tail = (f"published_speedup={t_first / t_pub:.2f} published_max_rel_err={pub_err:.2e} "
            f"published_peak_fraction={flops / t_pub / peak:.3g}")
    if args.skip_captum:
        print(tail)
        return

    # The all-positions definition: the fast engine vs Captum's per-layer reference.
    kw = dict(method=args.method, steps=args.steps, baseline=args.baseline)
    start = time.perf_counter()
    exact = FastKVA(loaded.model, KVASettings(**kw))
    print(f"fast exact (all)   : built and self-checked in {time.perf_counter() - start:.2f} s")
    # As the analyse stage does: the template prefix all probe prompts share is computed
    # once (inside the timed region, on first use). The sides run side by side, prompt by
    # prompt (``timed_side_by_side``).
    exact.set_shared_prefix(torch.tensor(common_prefix([p[0].tolist() for p in prompts])))
    captum = CaptumKVA(loaded.model, KVASettings(engine="captum", **kw))
    sides = {"exact": exact, "captum": captum}
    if args.all_logits:
        sides["all_logits"] = AllLogitsCaptumKVA(loaded.model, KVASettings(engine="captum", **kw))
    out, seconds = timed_side_by_side(sides, prompts)
    (fast, t_fast), (ref, t_ref) = ((out[k], seconds[k]) for k in ("exact", "captum"))
    print(f"fast exact (all)   : {t_fast / len(prompts):7.2f} s/prompt")
    print(f"captum reference   : {t_ref / len(prompts):7.2f} s/prompt")
    err = max(rel_err(a.scores, b.scores) for a, b in zip(fast, ref))
    # FLOPs each side runs (another call of each, counted; the engine's shared prefix, built
    # once in the timed run, is not counted again): their ratio is the speedup the engine
    # would have if both ran at the same fraction of the peak.
    exact_flops = sum(count_flops(lambda ids=ids: exact(ids)) for ids in prompts)
    ref_flops = sum(count_flops(lambda ids=ids: captum(ids)) for ids in prompts)
    print(f"fast exact (all)   : {exact_flops / len(prompts) / 1e9:7.1f} GFLOP/prompt, "
          f"{exact_flops / t_fast / 1e9:.1f} GFLOP/s; captum reference "
          f"{ref_flops / len(prompts) / 1e9:.1f} GFLOP/prompt, {ref_flops / t_ref / 1e9:.1f} GFLOP/s")
    tail += (f" exact_peak_fraction={exact_flops / t_fast / peak:.3g} "
             f"captum_peak_fraction={ref_flops / t_ref / peak:.3g} "
             f"captum_flop_ratio={ref_flops / exact_flops:.2f}")
    same = overlap(select_layer_balanced(np.stack([a.scores.numpy() for a in fast]), 10),
                   select_layer_balanced(np.stack([a.scores.numpy() for a in ref]), 10))
    print(f"fast vs captum layer_balanced q=10 overlap: {same:.4f}")
    if args.all_logits:
        before, t_before = out["all_logits"], seconds["all_logits"]
        same = max(rel_err(a.scores, b.scores) for a, b in zip(before, ref))
        print(f"captum all logits  : {t_before / len(prompts):7.2f} s/prompt "
              f"(same scores to {same:.1e}): kva_speedup_exact_vs_all_logits={t_before / t_fast:.2f}")
    print(f"kva_speedup_exact={t_ref / t_fast:.2f} max_rel_err={err:.2e} {tail}")


class AllLogitsCaptumKVA(CaptumKVA):
    """The reference as it ran before a90620d: the model's logits at every position (the
    same attribution; the logits of all but the last position are computed and dropped)."""

    def _prob(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids, use_cache=False).logits
        return torch.softmax(logits[:, -1].float(), dim=-1)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


if __name__ == "__main__":
    main()
