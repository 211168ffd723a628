"""Today's exact all-positions KVA engine against the same engine at an earlier commit, one process.

The question it answers: ``kva_speed.py``'s ``kva_speedup_exact`` fell from 5.61 to about 4
when the engine learned every architecture (a90620d). Did the engine get slower, or did its
reference get faster (``kva_speed.py --all-logits``)? This imports ``FastKVA`` as it was at
``--commit`` (the package taken from this repository's history with ``git archive`` into a
temporary directory, under another name, so both live in one process) and times it against
today's on the same probe prompts, alternating which runs first. Last line:

    then_over_now_time=<t> max_rel_err=<e>

t: the earlier engine's seconds over today's, summed over prompts and repeats (each engine's
shared template prefix is computed before timing; the analyse stage computes it inside its
first prompt, so these seconds per prompt are a little below ``kva_speed.py``'s); e: max over
prompts of max|now - then| / max|then|.

    .venv/bin/python benchmarks/kva_engine_then_now.py [--commit a4d7ca7] [--prompts 2]
        [--repeats 2] [--steps 7] [--model smollm2]

The default commit is a90620d's parent, the last one before the engine learned every
architecture. Any commit whose ``loki_exp/kva/engine.py`` has ``FastKVA(model, settings)``,
``KVASettings`` and ``FastKVA.set_shared_prefix`` (64baf07 on) works.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from loki_exp.config_check import check_config
from loki_exp.data.mmlu import ProbeSpec, load_probe, render_prompt
from loki_exp.kva.engine import FastKVA, KVASettings
from loki_exp.kva.lightning import common_prefix
from loki_exp.models import load_model

ROOT = Path(__file__).resolve().parents[1]
BEFORE_EVERY_ARCHITECTURE = "a4d7ca79ff463817af4d0942d6a6c5a731940db2"


def engine_module_at(commit: str, into: Path, name: str = "loki_then"):
    """``loki_exp.kva.engine`` as it was at ``commit``, imported as ``<name>.kva.engine``.

    git archive gives the files; the package is renamed (its imports of ``loki_exp`` too) so it
    does not shadow today's. Not a general loader: the earlier code must run on today's
    installed libraries."""
    done = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "loki_exp"],
                          capture_output=True)
    if done.returncode:
        raise SystemExit(f"--commit {commit!r}: expected a commit of this repository that has "
                         f"loki_exp/ ({done.stderr.decode().strip()})")
    archive = done.stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / name
    (into / "loki_exp").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bloki_exp\b", name, path.read_text()))
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]  # an earlier call's commit, from a directory since removed
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module(f"{name}.kva.engine")
    finally:
        sys.path.remove(str(into))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", default=BEFORE_EVERY_ARCHITECTURE)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--model", default="smollm2", help="a conf/model choice")
    args = parser.parse_args()

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        loaded = load_model(check_config(compose("config", overrides=[f"model={args.model}"]),
                                         groups=("model",)).model)
    tok = loaded.tokenizer
    prompts = [tok(render_prompt(tok, it), return_tensors="pt", add_special_tokens=False).input_ids
               for it in load_probe(ProbeSpec(limit=args.prompts)).items]
    prefix = torch.tensor(common_prefix([p[0].tolist() for p in prompts]))
    kw = dict(method="riemann_trapezoid", steps=args.steps, baseline="zero")
    with tempfile.TemporaryDirectory() as tmp:
        then = engine_module_at(args.commit, Path(tmp))
        engines = {"then": then.FastKVA(loaded.model, then.KVASettings(**kw)),
                   "now": FastKVA(loaded.model, KVASettings(**kw))}
        print(f"{loaded.name} fp32, {torch.get_num_threads()} threads, {len(prompts)} prompts of "
              f"{[p.shape[1] for p in prompts]} tokens, riemann_trapezoid x {args.steps}, zero "
              f"baseline; then = {args.commit[:12]}")
        for engine in engines.values():  # the shared prefix, as the analyse stage builds it
            engine.set_shared_prefix(prefix)
            engine(prompts[0][:, :prefix.numel() + 1])
        seconds = {name: 0.0 for name in engines}
        err = 0.0
        for repeat in range(args.repeats):
            for ids in prompts:
                order = list(engines) if repeat % 2 == 0 else list(engines)[::-1]
                scores = {}
                for name in order:
                    start = time.perf_counter()
                    scores[name] = engines[name](ids).scores
                    seconds[name] += time.perf_counter() - start
                err = max(err, float((scores["now"] - scores["then"]).abs().max()
                                     / scores["then"].abs().max()))
    n = args.repeats * len(prompts)
    print(f"then {seconds['then'] / n:.2f} s/prompt, now {seconds['now'] / n:.2f} s/prompt")
    print(f"then_over_now_time={seconds['then'] / seconds['now']:.3f} max_rel_err={err:.2e}")


if __name__ == "__main__":
    main()
