"""Every script in benchmarks/ runs on a tiny random model and prints its last line.

The benchmarks time the real SmolLM2 and are not run in CI; these smoke runs catch a script
that a change in the package broke (the configuration schema once broke train_step.py until
a review found it). Their numbers are not timings to read: only the exact ones are asserted.
"""

from __future__ import annotations

import re
import runpy
import sys

from tests.conftest import ROOT
from tests.tolerances import CROSS_PATH_FP32


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
    out = run_benchmark("train_step.py", "--arch", "tiny_llama", "--repeats", "2", "--steps", "1",
                        "--batch", "2", "--seq", "32", capsys=capsys, monkeypatch=monkeypatch)
    trainable = {line.split()[0]: int(line.rsplit(" ", 1)[1].replace(",", ""))
                 for line in out if line.split()[0] in ("loki", "lora", "full", "split")}
    # tiny_llama: 3 layers, d_model 64, d_ff 96; q=10 is 6 rows of 96 weights per layer.
    assert trainable["loki"] == trainable["split"] == 3 * 6 * 96
    assert trainable["loki"] < trainable["lora"] < trainable["full"]
    last = fields(out[-1])
    assert set(last) == {"loki_vs_lora_time", "loki_vs_lora_step_mem", "loki_vs_lora_state",
                         "loki_vs_split_time", "loki_vs_full_time"}
    assert 0 < float(last["loki_vs_lora_state"]) < 1


def test_adapter_size(capsys, monkeypatch):
    last = fields(run_benchmark("adapter_size.py", "--model", "tiny_llama",
                                capsys=capsys, monkeypatch=monkeypatch)[-1])
    assert int(last["rows"]) == 3 * 6
    assert int(last["export_bytes"]) > int(last["adapter_bytes"]) > 3 * 6 * 96 * 4  # fp32 rows


def test_kva_speed_fast_paths_equal_their_references(capsys, monkeypatch):
    out = run_benchmark("kva_speed.py", "--model", "tiny_llama", "--prompts", "1", "--steps", "2",
                        capsys=capsys, monkeypatch=monkeypatch)
    assert "layer_balanced q=10 overlap: 1.0000" in out[-2]
    last = fields(out[-1])
    # Float32 paths against their references: tests/tolerances.py.
    assert float(last["max_rel_err"]) < CROSS_PATH_FP32
    assert float(last["published_max_rel_err"]) < CROSS_PATH_FP32


def test_kva_speed_presets(capsys, monkeypatch):
    out = run_benchmark("kva_speed.py", "--model", "tiny_llama", "--prompts", "1", "--presets",
                        capsys=capsys, monkeypatch=monkeypatch)
    assert [fields(line)["preset"] for line in out if line.startswith("preset=")] == [
        "published", "published", "reference_captum", "paper_text"]


def test_kva_gpu_tiny(capsys, monkeypatch):
    last = fields(run_benchmark("kva_gpu.py", "--tiny", "--prompts", "6", "--batches", "2",
                                "--sample", "4", capsys=capsys, monkeypatch=monkeypatch)[-1])
    assert int(last["prompts"]) == 6 and float(last["s_per_prompt"]) > 0


def test_eval_suite_time(capsys, monkeypatch):
    out = run_benchmark("eval_suite_time.py", "--model", "tiny_llama", "--limit", "2",
                        "eval.bpb_limit=2", "eval.drift_prompts=2", "eval.drift_max_new_tokens=4",
                        capsys=capsys, monkeypatch=monkeypatch)
    last = fields(out[-1])
    assert last["limit"] == "2" and last["bpb_sets"] == "4x2" and float(last["suite_seconds"]) > 0
    bpb = {k: float(v) for line in out if line.startswith(" ") for k, v in fields(line).items()
           if not k.startswith("acc")}
    assert sorted(bpb) == sorted(f"{s}{c}" for s in ("gsm8k", "humaneval", "naturalqs", "jeopardy")
                                 for c in ("", "_chat"))
    assert all(0 < v < 30 for v in bpb.values())  # bits per byte of a random model: finite
