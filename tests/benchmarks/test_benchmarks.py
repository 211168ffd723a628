"""Every script in benchmarks/ runs on a tiny random model and prints its last line.

The benchmarks time the real SmolLM2 and are not run in CI; these smoke runs catch a script
that a change in the package broke (the configuration schema once broke train_step.py until
a review found it). Their numbers are not timings to read: only the exact ones are asserted.
"""

from __future__ import annotations

import re
import runpy
import subprocess
import sys

import pytest

from tests.support.paths import ROOT
from tests.support.tolerances import CROSS_PATH_FP32

# The benchmark scripts' smoke runs: seconds each, not in the fast loop.
pytestmark = pytest.mark.slow


def run_benchmark(name: str, *args: str, capsys, monkeypatch) -> list[str]:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [name, *args])
    capsys.readouterr()
    runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
    return capsys.readouterr().out.strip().splitlines()


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_train_step(capsys, monkeypatch):
    """Also: memory is measured in a step of its own, untimed (measuring gives the heap back
    to the OS first, and the timed steps would pay its page faults): one ``malloc_trim`` per
    arm and repeat, not one per timed step."""
    import ctypes

    trims, libc = [], ctypes.CDLL("libc.so.6")

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)
            return libc.malloc_trim(pad)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    out = run_benchmark("train_step.py", "--arch", "tiny_llama", "--repeats", "2", "--steps", "2",
                        "--batch", "2", "--seq", "32", "--profile", capsys=capsys,
                        monkeypatch=monkeypatch)
    assert len(trims) == 4 * 2
    profile = fields(out.pop())
    assert set(profile) == {"matmul_time_share", "matmul_peak_fraction", "attention_time_share",
                            "attention_flop_share"}
    assert 0 < float(profile["attention_flop_share"]) < 1
    arms = {line.split()[0]: line for line in out
            if line.split()[0] in ("loki", "lora", "full", "split")}
    trainable = {m: int(re.search(r"trainable ([\d,]+)", line)[1].replace(",", ""))
                 for m, line in arms.items()}
    flops = {m: float(re.search(r"([\d.]+) GFLOP/step", line)[1]) for m, line in arms.items()}
    # tiny_llama: 3 layers, d_model 64, d_ff 96; q=10 is 6 rows of 96 weights per layer.
    assert trainable["loki"] == trainable["split"] == 3 * 6 * 96
    assert trainable["loki"] < trainable["lora"] < trainable["full"]
    # LoKI computes no weight gradient for a frozen weight: fewer FLOPs than full training.
    assert 0 < flops["loki"] < flops["full"]
    ratios = fields(out[-2])
    assert set(ratios) == {"loki_vs_lora_time", "loki_vs_lora_step_mem", "loki_vs_lora_state",
                           "loki_vs_split_time", "loki_vs_full_time"}
    assert 0 < float(ratios["loki_vs_lora_state"]) < 1
    peak = fields(out[-1])
    assert float(peak["peak_gflops"]) > 0
    assert all(0 < float(peak[f"{m}_peak_fraction"]) for m in arms)


def test_train_step_compiled_arm(capsys, monkeypatch):
    """``--compile``: a fifth arm, LoKI as ``trainer.compile=true`` trains it, with the same
    step FLOPs as LoKI's (counted uncompiled) and its own ratio line."""
    out = run_benchmark("train_step.py", "--arch", "tiny_llama", "--repeats", "1", "--steps", "1",
                        "--batch", "2", "--seq", "32", "--compile", capsys=capsys,
                        monkeypatch=monkeypatch)
    flops = {line.split()[0]: re.search(r"([\d.]+) GFLOP/step", line)[1] for line in out
             if line.split()[0] in ("loki", "loki_compiled")}
    assert flops["loki_compiled"] == flops["loki"]
    assert set(fields(out[-1])) == {"loki_compiled_vs_loki_time", "loki_compiled_vs_loki_step_mem"}
    assert float(fields(out[-2])["loki_compiled_peak_fraction"]) > 0


def test_adapter_size(capsys, monkeypatch):
    last = fields(run_benchmark("adapter_size.py", "--model", "tiny_llama",
                                capsys=capsys, monkeypatch=monkeypatch)[-1])
    assert int(last["rows"]) == 3 * 6
    assert int(last["export_bytes"]) > int(last["adapter_bytes"]) > 3 * 6 * 96 * 4  # fp32 rows


def test_kva_speed_fast_paths_equal_their_references(capsys, monkeypatch):
    # Two prompts sharing a prefix (the engine's shared-prefix path), every side side by side.
    out = run_benchmark("kva_speed.py", "--model", "tiny_llama", "--prompts", "2", "--steps", "2",
                        "--all-logits", capsys=capsys, monkeypatch=monkeypatch)
    assert "layer_balanced q=10 overlap: 1.0000" in out[-3]
    assert float(fields(out[-2])["kva_speedup_exact_vs_all_logits"]) > 0
    # Every position's logits or the last one's: the same attribution in float32 through
    # differently shaped matmuls, the case CROSS_PATH_FP32 bounds (tests/support/tolerances.py).
    assert float(re.search(r"same scores to (\S+)\)", out[-2]).group(1)) < CROSS_PATH_FP32
    last = fields(out[-1])
    # Float32 paths against their references: tests/support/tolerances.py.
    assert float(last["max_rel_err"]) < CROSS_PATH_FP32
    assert float(last["published_max_rel_err"]) < CROSS_PATH_FP32
    assert float(last["published_peak_fraction"]) > 0
    assert float(last["exact_peak_fraction"]) > 0 and float(last["captum_peak_fraction"]) > 0
    # The reference re-runs every layer below l and backpropagates through every position.
    assert float(last["captum_flop_ratio"]) > 1


def test_kva_engine_then_now_loads_an_earlier_engine_beside_todays(capsys, monkeypatch):
    # HEAD's engine taken from git history beside the imported one: the same code (a clean
    # clone's HEAD is its working tree), the same scores. Two prompts share a prefix, so the
    # shared-prefix path runs on both sides.
    out = run_benchmark("kva_engine_then_now.py", "--model", "tiny_llama", "--commit", "HEAD",
                        "--prompts", "2", "--repeats", "1", "--steps", "2",
                        capsys=capsys, monkeypatch=monkeypatch)
    last = fields(out[-1])
    # One code, one input, one process: the same kernels in the same order, bit for bit.
    assert float(last["max_rel_err"]) == 0
    assert float(last["then_over_now_time"]) > 0


def test_kva_engine_then_now_names_a_bad_commit(capsys, monkeypatch):
    with pytest.raises(SystemExit, match=r"--commit 'no-such-commit': expected a commit of this "
                                         r"repository that has loki_exp/ \(.+\)"):
        run_benchmark("kva_engine_then_now.py", "--model", "tiny_llama", "--commit",
                      "no-such-commit", capsys=capsys, monkeypatch=monkeypatch)


def test_kva_engine_then_now_runs_the_engine_it_cites(capsys, monkeypatch):
    """The default commit (the README's row) still runs on today's libraries, and its scores
    are today's to float32 rounding."""
    script = (ROOT / "benchmarks" / "kva_engine_then_now.py").read_text()
    commit = re.search(r'BEFORE_EVERY_ARCHITECTURE = "(\w+)"', script).group(1)
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", commit],
                      capture_output=True).returncode:
        pytest.skip("a shallow clone: the commit is not in its history")
    out = run_benchmark("kva_engine_then_now.py", "--model", "tiny_llama", "--prompts", "2",
                        "--repeats", "1", "--steps", "2", capsys=capsys, monkeypatch=monkeypatch)
    # Two implementations of one float32 computation (their batches may differ): the bound of
    # tests/support/tolerances.py. On SmolLM2 they agreed bit for bit (README).
    assert float(fields(out[-1])["max_rel_err"]) < CROSS_PATH_FP32


def test_kva_speed_presets(capsys, monkeypatch):
    out = run_benchmark("kva_speed.py", "--model", "tiny_llama", "--prompts", "1", "--presets",
                        capsys=capsys, monkeypatch=monkeypatch)
    assert [fields(line)["preset"] for line in out if line.startswith("preset=")] == [
        "published", "published", "reference_captum", "paper_text"]


def test_kva_gpu_tiny(capsys, monkeypatch):
    last = fields(run_benchmark("kva_gpu.py", "--tiny", "--prompts", "6", "--batches", "2",
                                "--sample", "4", capsys=capsys, monkeypatch=monkeypatch)[-1])
    assert int(last["prompts"]) == 6 and float(last["s_per_prompt"]) > 0


def test_eval_suite_time(capsys, monkeypatch, tmp_path, tiny_models):
    tiny_models["tiny_llama"].model.save_pretrained(tmp_path / "tuned")
    out = run_benchmark("eval_suite_time.py", "--model", "tiny_llama", "--limit", "2",
                        "--tuned", str(tmp_path / "tuned"), "--before", "eval.benchmarks=[arc_easy]",
                        "eval.bpb_limit=2", "eval.drift_prompts=2", "eval.drift_max_new_tokens=4",
                        "eval.task_bpb_items=2", "eval.bfcl_trained_items=1",
                        "eval.bfcl_irrelevance_items=1", "eval.bfcl_transfer_items=0",
                        "eval.max_new_tokens=4", capsys=capsys, monkeypatch=monkeypatch)
    assert sum(line.startswith("BFCL generation") for line in out) == 4
    only = run_benchmark("eval_suite_time.py", "--model", "tiny_llama", "--limit", "2",
                         "--parts", "drift", "eval.drift_prompts=2", "eval.drift_max_new_tokens=4",
                         capsys=capsys, monkeypatch=monkeypatch)
    assert [line.split("  ")[0] for line in only[1:-1]] == ["-- base", "drift answers"]
    with pytest.raises(SystemExit):
        run_benchmark("eval_suite_time.py", "--model", "tiny_llama", "--parts", "drift,bogus",
                      capsys=capsys, monkeypatch=monkeypatch)
    assert "--parts: ['bogus'] are not parts" in capsys.readouterr().err
    last = fields(out[-1])
    assert last["limit"] == "2" and last["bpb_sets"] == "4x2" and float(last["suite_seconds"]) > 0
    assert float(last["tuned_seconds"]) > 0
    bpb = {k: float(v) for line in out[:out.index("-- tuned")] if line.startswith(" ")
           for k, v in fields(line).items() if not k.startswith("acc") and "gold" not in k
           and "peak" not in k and k != "correct"}
    assert sorted(bpb) == sorted(f"{s}{c}" for s in ("gsm8k", "humaneval", "naturalqs", "jeopardy")
                                 for c in ("", "_chat"))
    assert all(0 < v < 30 for v in bpb.values())  # bits per byte of a random model: finite
    gold = [fields(line) for line in out if "gold_bpb_peak_fraction" in line]
    assert len(gold) == 2 and all(0 < float(g["gold_bpb_peak_fraction"]) for g in gold)
    parts = [line.split("  ")[0] for line in out]
    assert {"BFCL generation (before)", "drift KL, base loaded again (before)",
            "drift KL (base loaded once)", "BFCL generation (5 items)",
            "task gold bpb (3 of 6 items)"} <= set(parts)
    # The generated trained items' gold answers come from the generation's prompt caches.
    assert sum(line.endswith("gold answers scored over its prompts: 3") for line in out) == 2
    # generation that drops ended and settled rows scores every item as generate did, each
    # text the start of generate's, for both models
    assert [" same scores: True  texts the start of the old: True " in line for line in out
            if line.startswith("BFCL generation (before)")] == [True, True]
    # shared contexts score every item as lm-eval's own loop does, for both models
    assert [line.endswith("same items: True") for line in out
            if line.startswith("arc_easy (before)")] == [True, True]
    diffs = [float(fields(line)["max_rel_diff"]) for line in out if line.startswith("bpb ")
             and "(before)" in line]
    assert len(diffs) == 8 and max(diffs) < CROSS_PATH_FP32
    gold_diffs = [float(fields(line)["max_rel_diff"]) for line in out
                  if line.startswith("task gold bpb (before)")]
    assert len(gold_diffs) == 2 and max(gold_diffs) < CROSS_PATH_FP32


def test_flop_count_includes_the_cpus_flash_attention():
    """torch's FlopCounterMode has no formula for the CPU flash kernels: benchmarks/peak.py adds
    torch's own SDPA ones (forward 4 B H S^2 D, backward 2.5x), halved for a causal call."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("peak", ROOT / "benchmarks" / "peak.py")
    peak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peak)
    q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))

    def attend(causal):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

    forward = 4 * 2 * 4 * 64 * 64 * 32
    assert peak.count_flops(lambda: attend(False)) == 3.5 * forward
    assert peak.count_flops(lambda: attend(True)) == 3.5 * forward / 2


def test_fp32_path_error_stays_inside_the_tolerance(capsys, monkeypatch):
    """The measurement behind tests/support/tolerances.py, on this machine's kernels: the budget holds it."""
    import torch

    last = fields(run_benchmark("fp32_path_error.py", capsys=capsys, monkeypatch=monkeypatch)[-1])
    eps = torch.finfo(torch.float32).eps
    assert set(last) == {"worst_one_eps", "worst_batch_eps", "worst_batch_vs_one_eps"}
    assert all(0 <= float(v) * eps < CROSS_PATH_FP32 for v in last.values())


def test_bootstrap_speed(capsys, monkeypatch):
    """Its two sides give the same interval (the script asserts it) and it prints the ratio."""
    last = fields(run_benchmark("bootstrap_speed.py", capsys=capsys, monkeypatch=monkeypatch)[-1])
    assert float(last["bootstrap_speedup"]) > 0
