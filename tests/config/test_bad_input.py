"""Bad-input survey: each bad override, file or data through the CLI gets one clear error
naming the bad value, a non-zero exit, and leaves the cache and earlier outputs as they were
(and no run dir of its own)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.support.caches import linked_cache
from tests.support.paths import ROOT


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (following the cache's links) -> (size, mtime)."""
    found = {}
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            stat = (Path(folder) / name).stat()
            found[str(Path(folder, name).relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def run_cli():
    """``run_cli(*args)`` -> returncode/stdout/stderr of ``python -m loki_exp.train ARGS``, each a
    fresh process forked from one that imported the CLI once (tests/support/cli_forkserver.py)."""
    server = subprocess.Popen([sys.executable, "-m", "tests.support.cli_forkserver", "loki_exp.train"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(server.stdout.readline()) == {"ready": True}

    def call(*args: str) -> SimpleNamespace:
        server.stdin.write(json.dumps({"args": list(args)}) + "\n")
        server.stdin.flush()
        return SimpleNamespace(**json.loads(server.stdout.readline()))

    yield call
    server.stdin.close()
    server.wait(timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cache, an earlier run's outputs, and the bad files the cases point at."""
    root = tmp_path_factory.mktemp("bad_input")
    cache = linked_cache(root / "cache")
    (cache / "kva").mkdir()
    (cache / "kva" / "kept.h5").write_bytes(b"an earlier store")
    earlier = root / "outputs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "run.json").write_text(json.dumps({"metrics": {"forgetting/avg": 1.0}}))
    files = root / "files"
    files.mkdir()
    (files / "malformed.json").write_text('{"bad json')
    (files / "two_layers.json").write_text("[[1], [2]]")
    (files / "out_of_range.json").write_text("[[1], [2], [999]]")
    (files / "bad.jsonl").write_text('{"prompt": "hi", "response": "yo"}\nnot json\n')
    (files / "not_a.ckpt").write_text("x")
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, files / "unsafe.ckpt")
    return {"root": root, "cache": cache, "files": files, "outputs": root / "outputs"}


# Refused by the configuration check (config_check.check_config, then pipeline.validate for
# what only a stage's inputs tell): checked in this process. (overrides, expected message);
# {f} is the folder of bad files.
CHECKED = [
    (["quota=abc"], "quota='abc' must be a number"),
    (["quota=0"], "quota=0 must be a number in (0, 100]"),
    (["stages=[analyse,train]"], "stages has ['train']; expected some of ['analyse', "),
    (["model.source=bogus"], "model.source='bogus' is not known"),
    (["kva.steps=0"], "kva.steps=0 must be an integer >= 2"),
    (["kva.baseline=nope"], "kva.baseline='nope' is not known"),
    (["kva.store_dtype=int8"], "kva.store_dtype='int8' is not known"),
    (["kva.dtype=int4"], "kva.dtype='int4' is not known; expected one of ['float32'"),
    (["kva.probe.pick=best"], "kva.probe.pick='best' is not known; expected one of ['first', 'random']"),
    (["kva.probe.shots=3"], "kva.probe.shots=3 is not known; expected one of [0, 5]"),
    (["kva.probe.subjects=astro"], "kva.probe.subjects='astro' is not known"),
    (["kva.probe.subjects=[astrology]"], "kva.probe.subjects has unknown subjects ['astrology']"),
    (["dataset.overflow=wrap"], "dataset.overflow='wrap' is not known; expected one of ['drop', 'truncate']"),
    (["trainer.max_epochs=2"], "trainer.max_steps=80 and trainer.max_epochs=2: set exactly one"),
    (["method.name=adapter"], "method.name='adapter' is not known"),
    (["method=lora", "method.rank=0"], "method.rank=0 must be a positive integer"),
    (["method.lr=-1"], "method.lr=-1 must be a positive number"),
    (["trainer.max_steps=-3"], "trainer.max_steps=-3 must be a positive integer"),
    (["trainer.precision=fp7"], "trainer.precision='fp7' is not known"),
    (["trainer.checkpoint_every_n_steps=-1"], "trainer.checkpoint_every_n_steps=-1 must be an integer >= 0"),
    (["trainer.resume_from={f}/missing.ckpt"], "no such checkpoint file"),
    (["trainer.resume_from={f}/not_a.ckpt"], "is not a PyTorch checkpoint"),
    (["trainer.resume_from={f}/unsafe.ckpt"], "holds argparse.Namespace; refused"),
    (["trainer.resume_from=last"], "trainer.resume_from=last: no checkpoint at"),
    (["parallelism.devices=0"], "parallelism.devices=0 must be a positive integer"),
    (["parallelism.mode=deepspeed"], "parallelism.mode='deepspeed' is not known"),
    (["eval.benchmarks=[nope]", "stages=[evaluate]"], "eval.benchmarks has ['nope']"),
    (["eval.bpb=[mmlu]"], "eval.bpb has ['mmlu']; expected some of ['gsm8k', 'humaneval', "
                          "'naturalqs', 'jeopardy']"),
    (["eval.bfcl_trained_items=-2"], "eval.bfcl_trained_items=-2 must be an integer >= 0"),
    (["eval.every_n_steps=-5"], "eval.every_n_steps=-5 must be an integer >= 0"),
    (["eval.every_n_steps=2.5"], "eval.every_n_steps=2.5 must be an integer"),
    (["eval.curve_steps=[4,0]"], "eval.curve_steps=[4, 0]: expected a list of optimizer steps"),
    (["eval.every_n_steps=10", "parallelism=fsdp"], "eval.every_n_steps=10 needs the whole model "
                                                    "on one process"),
    (["strategy=random", "strategy.seed=abc"], "strategy.seed='abc' must be an integer"),
    (["dataset.irrelevance_share=1.0"], "dataset.irrelevance_share=1 must be a number in [0, 1)"),
    (["dataset.irrelevance_share=-0.1"], "dataset.irrelevance_share=-0.1 must be a number in [0, 1)"),
    (["eval.drift_prompts=-1"], "eval.drift_prompts=-1 must be an integer >= 0"),
    # Unknown keys and typos: refused before any stage, naming the key (config_check.py).
    (["+trainer.max_stepz=3"], "trainer.max_stepz is not a known key; expected one of ['max_steps'"),
    (["eval.forgetting_metric=acc_nrom"], "eval.forgetting_metric='acc_nrom' is not known"),
    (["trainer.deterministic=maybe"], "trainer.deterministic='maybe' must be true or false"),
]

# Refused by Hydra or by a stage (a file, the data, the hub, a callback), and three of the
# checked ones again: through the command line, each a process of its own.
CASES = [
    (["quota=abc"], "quota='abc' must be a number"),
    (["strategy=nope"], "Could not find 'strategy/nope'"),
    (["positions_file={f}/missing.json"], "positions file {f}/missing.json does not exist"),
    (["positions_file={f}/malformed.json"], "is not valid JSON"),
    (["positions_file={f}/two_layers.json"], "has 2 layer lists, the model has 3 layers"),
    (["positions_file={f}/out_of_range.json"], "layer 2 has indices [999] outside [0, 64)"),
    (["dataset=jsonl", "dataset.path={f}/missing.jsonl"], "dataset.path='{f}/missing.jsonl' does not exist"),
    (["dataset=jsonl", "dataset.path={f}/bad.jsonl"], "bad.jsonl:2"),
    (["model=llama"], "the hub cannot be reached from here"),
    (["kva.store={f}/missing.h5"], "KVA store {f}/missing.h5 does not exist"),
    (["kva=nope"], "Could not find 'kva/nope'"),
    (["method=nope"], "Could not find 'method/nope'"),
    (["trainer.resume_from={f}/unsafe.ckpt"], "holds argparse.Namespace; refused"),
    (["trainer.callbacks=[{_target_:nope.Nope}]", "stages=[implant]", "method=lora"],
     "callback 'nope.Nope' could not be built"),
    (["+trainer.max_stepz=3"], "trainer.max_stepz is not a known key; expected one of ['max_steps'"),
]


@pytest.mark.parametrize("overrides,message", CHECKED, ids=[" ".join(c[0]) for c in CHECKED])
def test_bad_config_is_refused_by_the_check_in_one_line(compose_raw, world, overrides, message):
    """What the command line prints after "loki_exp error:" (the three cases above show the
    whole path: exit code 2, one line, no run dir, the cache untouched)."""
    from loki_exp.config_check import check_config
    from loki_exp.errors import LokiError
    from loki_exp.pipeline import validate

    f = str(world["files"])
    cache_before = _snapshot(world["cache"])
    with pytest.raises(LokiError) as err:
        validate(check_config(compose_raw(
            "model=tiny_llama", "kva.limit=2", "kva.steps=2",
            *[o.replace("{f}", f) for o in overrides], f"paths.cache_dir={world['cache']}",
            f"paths.output_dir={world['outputs'] / 'this_run'}")))
    assert message.replace("{f}", f) in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(world["cache"]) == cache_before


@pytest.mark.cli
@pytest.mark.parametrize("overrides,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_clear_error_and_touches_nothing(run_cli, world, overrides, message):
    f = str(world["files"])
    cache_before, outputs_before = _snapshot(world["cache"]), _snapshot(world["outputs"])
    run_dir = world["outputs"] / "this_run"
    proc = run_cli("model=tiny_llama", "kva.limit=2", "kva.steps=2",
                   *[o.replace("{f}", f) for o in overrides], f"paths.cache_dir={world['cache']}",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode != 0
    assert message.replace("{f}", f) in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith(("loki_exp error:", "In 'config': Could not find"))]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert _snapshot(world["cache"]) == cache_before
    assert _snapshot(world["outputs"]) == outputs_before
    assert not run_dir.exists()
