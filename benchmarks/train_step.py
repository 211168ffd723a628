"""Training-step cost on the real SmolLM2-135M: LoKI q=10 against LoRA r16, full
fine-tuning and a reconstruction of the original LoKI code's split module; batch 4 x 256
tokens, AdamW.

Like with like: all four models (five with ``--compile``) live in this one process and their
steps are interleaved (repeat r runs every method once, in a rotated order), so machine
noise hits every arm alike; every arm's frozen ``nn.Linear`` weights are handled the same
way (``FrozenLinear``, as ``apply_loki`` does for LoKI); memory is a training step's own
peak above what was allocated before it, measured in one more step per repeat that is not
timed (CPU: the peak RSS, reset before the step through ``/proc/self/clear_refs``, after
giving freed heap back with ``malloc_trim``; GPU: ``torch.cuda.max_memory_allocated``), plus
the persistent training state (trainable parameters, their gradients and AdamW's moments)
counted from the tensors. Each ratio is the median over repeats of the per-repeat ratio,
with its min and max. Each arm's achieved FLOP/s is the matmul and attention FLOPs of one of
its steps (``benchmarks/peak.py``: torch's FlopCounterMode, forward and backward as
executed; LoKI and LoRA compute no weight gradient for a frozen weight, so what runs is what
they need) over its median step time, and its fraction of the peak that ``torch.matmul``
reaches on the model's own Linear shapes in the step's precision, timed in this process.
Last lines:

    loki_vs_lora_time=<median> [<min>, <max>] loki_vs_lora_step_mem=... loki_vs_lora_state=...
    loki_vs_split_time=... loki_vs_full_time=...
    peak_gflops=<matmul peak> loki_peak_fraction=<f> lora_peak_fraction=... full_peak_fraction=...

    .venv/bin/python benchmarks/train_step.py [--repeats 5 --steps 3] [--compile]

``--compile`` adds a fifth arm, LoKI with its decoder layers compiled as ``trainer.compile=true``
trains (``loki_exp/implant/compiled.py``; compiled in the warm-up step, not timed), and the line

    loki_compiled_vs_loki_time=<median> [<min>, <max>] loki_compiled_vs_loki_step_mem=...

Precision: bf16 autocast where the CPU has bf16 hardware, else fp32 (``--autocast``).
On a GPU: ``--device cuda --arch llama-1b --batch 8 --seq 1024`` (a random model of
Llama-3.2-1B's shape; cost does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/peak.py
from peak import CPU_ATTENTION, count_flops, linear_shapes, matmul_peak  # noqa: E402

from loki_exp.implant.compiled import compiled_layers, eager_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("loki", "lora", "full", "split")


class SplitLinear(nn.Module):
    """A reconstruction of the original LoKI code's module from its description (not its
    code): an ``active`` Linear for the selected rows and a ``frozen`` one for the rest,
    concatenated and re-ordered by gather."""

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


def _freeze_linears(model: nn.Module) -> None:
    """Every frozen plain Linear becomes a FrozenLinear, in every arm alike."""
    from loki_exp.implant.loki_linear import FrozenLinear

    for module in model.modules():
        if type(module) is nn.Linear and not module.weight.requires_grad:
            module.__class__ = FrozenLinear


def _prepare(method: str, model: nn.Module, positions: list[list[int]]) -> nn.Module:
    from omegaconf import OmegaConf

    from loki_exp.implant import methods

    if method == "split":
        model.requires_grad_(False)
        for block, rows in zip(model.model.layers, positions):
            block.mlp.down_proj = SplitLinear(block.mlp.down_proj, rows)
    else:
        lora = {"rank": 16, "alpha": 32, "target_modules": "all-linear"} if method == "lora" else {}
        cfg = OmegaConf.create({"name": method, "lr": 1e-3, **lora})  # lr: unused here
        model = methods.prepare(cfg, model, positions)
    _freeze_linears(model)
    return model


def _model(arch: str) -> nn.Module:
    if arch != "llama-1b":  # a conf/model choice
        from hydra import compose, initialize_config_dir

        from loki_exp.config_check import check_config
        from loki_exp.models import load_model

        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            composed = compose("config", overrides=[f"model={arch}"])
            return load_model(check_config(composed, groups=("model",)).model).model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


class StepPeak:
    """The memory a training step adds at its peak over what was allocated before it (MiB)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.libc = None if self.cuda else ctypes.CDLL("libc.so.6")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
        raise RuntimeError(f"/proc/self/status has no {field}")

    @contextlib.contextmanager
    def measure(self, out: list[float]):
        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            out.append((torch.cuda.max_memory_allocated() - before) / 2**20)
            return
        self.libc.malloc_trim(0)  # freed heap back to the OS, so RSS is what is in use
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
        before = self._status("VmRSS")
        yield
        out.append((self._status("VmHWM") - before) / 1024)


def _state_mb(model: nn.Module, optimizer) -> float:
    """Trainable parameters + their gradients + AdamW's moments (and fp32 masters)."""
    tensors = [p for p in model.parameters() if p.requires_grad]
    tensors += [p.grad for p in tensors if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values()
                if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


class Arm:
    def __init__(self, method: str, args: argparse.Namespace, batch: dict,
                 compiled: contextlib.ExitStack):
        from loki_exp.implant.module import CausalLMTuner
        from loki_exp.model_access import node_grid
        from loki_exp.selection import select_layer_balanced

        model = _model(args.arch)
        # q=10 rows from random scores: cost does not depend on which rows are chosen.
        scores = np.random.default_rng(0).normal(size=(8, *node_grid(model)))
        self.model = _prepare(method.removesuffix("_compiled"), model,
                              select_layer_balanced(scores, 10)).to(args.device)
        self.model.train()
        self.tuner = CausalLMTuner(self.model, lr=1e-4, max_steps=1000)
        self.optimizer = self.tuner.configure_optimizers()["optimizer"]
        if method.endswith("_compiled"):  # as trainer.compile=true trains; to the end
            compiled.enter_context(compiled_layers(self.model, self.tuner.lm))
        self.batch, self.device, self.autocast = batch, torch.device(args.device), args.autocast
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step_flops(self) -> int:
        """The FLOPs the step needs, counted on the uncompiled step (compiled, the attention
        also computes its masked half: not counted)."""
        with eager_layers(self.model):
            return count_flops(self.step)

    def step(self) -> None:
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast == "bf16"
               else contextlib.nullcontext())
        with ctx:
            loss = self.tuner.response_loss(self.batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _spread(values: list[float]) -> str:
    return f"{np.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    from loki_exp.resolvers import cpu_has_native_bf16

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm per repeat")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="smollm2",
                        help="a conf/model choice, or llama-1b (random, Llama-3.2-1B's shape)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--autocast", choices=["bf16", "none"], default=None,
                        help="default: bf16 on a GPU or a CPU with bf16 hardware, else none")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one LoKI step: where its time goes")
    parser.add_argument("--compile", action="store_true",
                        help="also LoKI with its decoder layers compiled, as trainer.compile=true")
    args = parser.parse_args()
    methods = METHODS + ("loki_compiled",) if args.compile else METHODS
    if args.autocast is None:
        args.autocast = "bf16" if args.device != "cpu" or cpu_has_native_bf16() else "none"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=gen)  # any vocab >= 40k
    labels = ids.clone()
    labels[:, : args.seq * 3 // 4] = -100  # loss on the last quarter, like prompt + response
    batch = {k: v.to(args.device) for k, v in
             {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}.items()}
    # The compiled arm's layers stay compiled to the end, then are restored and dynamo's
    # graphs dropped (compiled_layers), also when the benchmark runs inside a test process.
    with contextlib.ExitStack() as compiled:
        arms = {m: Arm(m, args, batch, compiled) for m in methods}
        for arm in arms.values():  # warm-up: allocates AdamW's state, fills caches
            arm.step()
        peak = StepPeak(torch.device(args.device))
        ms = {m: [] for m in methods}
        mem = {m: [] for m in methods}
        for r in range(args.repeats):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for m in order:
                times = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    arms[m].step()
                    times.append(time.perf_counter() - start)
                ms[m].append(1000 * float(np.median(times)))
                # Memory in a step of its own, untimed: measuring gives the freed heap back to the
                # OS first, and the step then pays page faults for its whole working set, which
                # the training loop's steps never do (it was 0.3 s of a 1.6 s bf16 step).
                with peak.measure(mem[m]):
                    arms[m].step()
        state = {m: _state_mb(a.model, a.optimizer) for m, a in arms.items()}
        flops = {m: a.step_flops() for m, a in arms.items()}
        dtype = torch.bfloat16 if args.autocast == "bf16" else torch.float32
        peak_flops = matmul_peak(linear_shapes(arms["full"].model, args.batch * args.seq), dtype,
                                 args.device)
        achieved = {m: flops[m] / (np.median(ms[m]) / 1000) for m in methods}
        print(f"{args.arch}, batch {args.batch} x {args.seq}, autocast {args.autocast}, "
              f"{args.repeats} interleaved repeats x {args.steps} steps")
        for m in methods:
            print(f"{m:6s} {np.median(ms[m]):8.0f} ms/step [{min(ms[m]):.0f}, {max(ms[m]):.0f}]  "
                  f"step peak {np.median(mem[m]):7.0f} MiB  state {state[m]:7.0f} MiB  "
                  f"trainable {arms[m].trainable:,}  {flops[m] / 1e9:8.3f} GFLOP/step "
                  f"{achieved[m] / 1e9:6.1f} GFLOP/s", flush=True)

        def ratio(a: str, b: str, series: dict) -> str:
            return _spread([x / y for x, y in zip(series[a], series[b])])

        print(f"loki_vs_lora_time={ratio('loki', 'lora', ms)} "
              f"loki_vs_lora_step_mem={ratio('loki', 'lora', mem)} "
              f"loki_vs_lora_state={state['loki'] / state['lora']:.3f} "
              f"loki_vs_split_time={ratio('loki', 'split', ms)} "
              f"loki_vs_full_time={ratio('loki', 'full', ms)}")
        print(f"peak_gflops={peak_flops / 1e9:.1f} ({dtype}, torch.matmul on the model's Linear "
              f"shapes) " + " ".join(f"{m}_peak_fraction={achieved[m] / peak_flops:.3g}"
                                     for m in methods))
        if args.compile:
            print(f"loki_compiled_vs_loki_time={ratio('loki_compiled', 'loki', ms)} "
                  f"loki_compiled_vs_loki_step_mem={ratio('loki_compiled', 'loki', mem)}")
        if args.profile:
            print(profile_line(arms["loki"], peak_flops))


def profile_line(arm: Arm, peak_flops: float) -> str:
    """Where one LoKI step's time goes: the matmuls' and the attention kernels' share of the
    profiled time (torch.profiler, self CPU time), the matmuls' FLOP/s against the peak and
    the attention's share of the step's FLOPs."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        arm.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm",
                                                                         "aten::bmm"))
    attention_us = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        arm.step()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in by_op.items() if "scaled_dot_product" in op)
    matmul = sum(n for op, n in by_op.items() if op.split(".")[-1] in ("mm", "addmm", "bmm"))
    return (f"loki_profile: matmul_time_share={matmul_us / total:.2f} "
            f"matmul_peak_fraction={matmul / (matmul_us / 1e6) / peak_flops:.2f} "
            f"attention_time_share={attention_us / total:.2f} "
            f"attention_flop_share={attention / counter.get_total_flops():.3f}")


if __name__ == "__main__":
    main()
