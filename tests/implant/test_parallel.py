"""Several processes (DDP, FSDP2 on CPU/gloo), sweeps of them, and killed-then-resumed runs.

Each test drives ``python -m loki_exp.train`` as a user does, on the tiny random Llama.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loki_exp.models import load_model
from tests.support.caches import linked_cache
from tests.support.cli import run_cli
from tests.support.paths import ROOT

TRAIN = ["model=tiny_llama", "kva.limit=4", "kva.steps=3", "trainer.batch_size=4",
         "trainer.precision=32-true", "trainer.checkpoint_every_n_steps=0", "logger=csv",
         "stages=[analyse,select,implant,export]"]
CPU2 = ["parallelism.accelerator=cpu", "parallelism.devices=2"]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def _ok(proc) -> None:
    """Exit code 0; else every rank's error lines (the ranks share stderr) and the tail."""
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + proc.stderr[-2000:]


@pytest.mark.distributed
def test_ddp_and_fsdp_train_the_same_rows_as_one_process(tmp_path, compose_cfg):
    """KVA, selection and 2 training steps under 1 process, DDP x2 and FSDP2 x2 (each with
    its own cache, so each computes KVA itself): same positions, same trained rows, and no
    other weight moved."""
    runs = {}
    for name, extra in (("single", []), ("ddp", ["parallelism=ddp", *CPU2]),
                        ("fsdp", ["parallelism=fsdp", *CPU2])):
        cache = linked_cache(tmp_path / f"cache_{name}")
        _ok(run_cli(*TRAIN, "trainer.max_steps=2", *extra, f"paths.cache_dir={cache}",
                    f"hydra.run.dir={tmp_path / name}"))
        runs[name] = tmp_path / name
    positions = {n: json.loads((d / "positions.json").read_text()) for n, d in runs.items()}
    assert positions["ddp"] == positions["single"] == positions["fsdp"]

    base = load_model(compose_cfg("model=tiny_llama").model).model.state_dict()
    one = _weights(runs["single"])
    for name in ("ddp", "fsdp"):
        other = _weights(runs[name])
        for key, value in one.items():
            torch.testing.assert_close(other[key], value, rtol=0, atol=1e-6, msg=f"{name} {key}")
    for name, run_dir in runs.items():
        weights = _weights(run_dir)
        for key, value in weights.items():
            if not key.endswith("mlp.down_proj.weight"):
                assert torch.equal(value, base[key]), f"{name}: frozen {key} changed"
                continue
            layer = int(key.split(".")[2])
            changed = (value != base[key]).any(dim=1).nonzero().flatten().tolist()
            assert changed == positions[name][layer], f"{name}: rows moved outside the selection"


@pytest.mark.distributed
def test_lora_under_ddp_and_fsdp_equals_one_process(tmp_path):
    """peft adapters are initialised identically on every rank (FSDP2 broadcasts nothing)."""
    cache = linked_cache(tmp_path / "cache")
    common = [*TRAIN, "method=lora", "trainer.max_steps=2", "stages=[implant,export]",
              f"paths.cache_dir={cache}"]
    for name, extra in (("single", []), ("ddp", ["parallelism=ddp", *CPU2]),
                        ("fsdp", ["parallelism=fsdp", *CPU2])):
        _ok(run_cli(*common, *extra, f"hydra.run.dir={tmp_path / name}"))
    one = _weights(tmp_path / "single")
    for name in ("ddp", "fsdp"):
        other = _weights(tmp_path / name)
        for key, value in one.items():
            torch.testing.assert_close(other[key], value, rtol=0, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.distributed
def test_multirun_with_ddp_leaves_one_complete_run_dir_per_job(tmp_path):
    outputs_before = set((ROOT / "outputs").glob("*/*")) if (ROOT / "outputs").exists() else set()
    cache = linked_cache(tmp_path / "cache")
    sweep = tmp_path / "sweep"
    proc = run_cli("--multirun", *TRAIN, "trainer.max_steps=1", "parallelism=ddp", *CPU2,
                   "quota=5,10", f"paths.cache_dir={cache}", f"hydra.sweep.dir={sweep}",
                   timeout=600)
    _ok(proc)
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    for job, quota in (("0", 5), ("1", 10)):
        record = json.loads((sweep / job / "run.json").read_text())
        assert record["config"]["quota"] == quota
        assert record["config"]["parallelism"]["mode"] == "ddp"
        assert record["implant"]["trainable_parameters"] > 0
        assert (sweep / job / "model" / "model.safetensors").exists()
        assert (sweep / job / ".hydra" / "config.yaml").exists()
    # No rank wrote a run dir of its own anywhere else.
    after = set((ROOT / "outputs").glob("*/*")) if (ROOT / "outputs").exists() else set()
    assert after == outputs_before


def _positions_file(tmp_path) -> str:
    path = tmp_path / "positions.json"
    path.write_text(json.dumps([[1, 5, 9], [0, 2, 4], [63, 7, 8]]))
    return str(path)


@pytest.mark.cli
@pytest.mark.parametrize("parallel", [pytest.param([], id="single"), pytest.param(
    ["parallelism=fsdp", *CPU2], id="fsdp", marks=pytest.mark.distributed)])
def test_killed_training_resumes_to_the_same_rows(tmp_path, parallel):
    """SIGKILL at step 3 of 6 (checkpoint every 2 steps, mid-epoch), rerun with
    trainer.resume_from=last in the same run dir: the same rows as an uninterrupted run."""
    cache = linked_cache(tmp_path / "cache")
    common = [*TRAIN, *parallel, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2",
              "trainer.deterministic=true", "stages=[select,implant,export]",
              f"positions_file={_positions_file(tmp_path)}", f"paths.cache_dir={cache}"]
    _ok(run_cli(*common, f"hydra.run.dir={tmp_path / 'straight'}"))
    killed = run_cli(*common, "trainer.callbacks=[{_target_:tests.support.callbacks.KillAt,step:3}]",
                     f"hydra.run.dir={tmp_path / 'resumed'}")
    assert killed.returncode == -9, killed.stderr[-2000:]  # rank 0 killed; rank 1 goes with it
    assert not (tmp_path / "resumed" / "model").exists()
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    _ok(run_cli(*common, "trainer.resume_from=last", f"hydra.run.dir={tmp_path / 'resumed'}"))
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["implant"] is not None


@pytest.mark.cli
def test_killed_kva_resumes_through_train(tmp_path):
    """The KVA stage killed after 2 of 5 prompts resumes on rerun and gives the same store."""
    import h5py
    import numpy as np

    common = ["model=tiny_llama", "kva.limit=5", "kva.steps=3", "kva.batch_size=1",
              "stages=[analyse,select]"]
    ref_cache = linked_cache(tmp_path / "ref")
    _ok(run_cli(*common, f"paths.cache_dir={ref_cache}", f"hydra.run.dir={tmp_path / 'r0'}"))
    cache = linked_cache(tmp_path / "cache")
    killed = run_cli(*common, "kva.callbacks=[{_target_:tests.support.callbacks.KillAt,predict_batches:2}]",
                     f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list((cache / "kva").rglob("*.partial/*.h5")) and not list((cache / "kva").rglob("*.h5.tmp"))
    resumed = run_cli(*common, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'r2'}")
    _ok(resumed)
    assert "5 prompts, 2 already in partial shards, 3 to compute" in resumed.stderr + resumed.stdout
    (ref,), (got,) = list((ref_cache / "kva").rglob("*.h5")), list((cache / "kva").rglob("*.h5"))
    with h5py.File(ref, "r") as a, h5py.File(got, "r") as b:
        np.testing.assert_array_equal(a["attributions"][()], b["attributions"][()])
        assert list(a["sample_id"]) == list(b["sample_id"])
    assert (json.loads((tmp_path / "r2" / "positions.json").read_text())
            == json.loads((tmp_path / "r0" / "positions.json").read_text()))


@pytest.mark.cli
@pytest.mark.parametrize("bad", ["parallelism.devices=0", "parallelism.mode=deepspeed"])
def test_bad_parallelism_is_one_clear_error(tmp_path, bad):
    proc = run_cli("model=tiny_llama", bad, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2 and "loki_exp error: parallelism." in proc.stderr


def test_global_batches_are_the_same_at_any_world_size_and_resume_skips():
    from loki_exp.data.sft import GlobalBatchSampler

    one = list(GlobalBatchSampler(22, 4, seed=3))
    assert len(one) == 5 and all(len(b) == 4 for b in one)  # the incomplete 6th batch is dropped
    ranks = [list(GlobalBatchSampler(22, 4, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == one
    resumed = GlobalBatchSampler(22, 4, seed=3)
    resumed.skip = 2
    assert list(resumed) == one[2:] and list(resumed) == one  # only the first epoch is partial
    other_epoch = GlobalBatchSampler(22, 4, seed=3)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != one
    from loki_exp.errors import LokiError

    with pytest.raises(LokiError, match="trainer.batch_size=4 is the global batch"):
        GlobalBatchSampler(22, 4, world_size=3)


def test_length_grouped_batches_keep_the_epoch_and_the_global_batch():
    """Grouped by length: the same examples per epoch as the shuffled order, each once; the
    same global batches at any world size (ranks take contiguous slices); resume skips; and
    far less padding on lengths like BFCL's."""
    import numpy as np

    from loki_exp.data.sft import GlobalBatchSampler, real_token_share

    lengths = np.random.default_rng(0).lognormal(6.0, 0.5, size=987).astype(int).tolist()
    plain = GlobalBatchSampler(987, 4, seed=42)
    grouped = GlobalBatchSampler(987, 4, seed=42, lengths=lengths)
    flat = [i for b in grouped.global_batches() for i in b]
    assert len(flat) == len(set(flat)) == 984  # 246 batches of 4, every example at most once
    assert set(flat) == {i for b in plain.global_batches() for i in b}
    assert all(len(b) == 4 for b in grouped.global_batches())
    ranks = [list(GlobalBatchSampler(987, 4, r, 2, seed=42, lengths=lengths)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == list(grouped)
    resumed = GlobalBatchSampler(987, 4, seed=42, lengths=lengths)
    resumed.skip = 10
    assert list(resumed) == list(grouped)[10:]
    other = GlobalBatchSampler(987, 4, seed=42, lengths=lengths)
    other.set_epoch(1)
    assert list(other) != list(grouped)
    shuffled_share = real_token_share(plain.global_batches(), lengths)
    grouped_share = real_token_share(grouped.global_batches(), lengths)
    assert shuffled_share < 0.8 < 0.97 < grouped_share


def test_a_checkpoint_from_before_the_length_grouping_resumes_ungrouped_only():
    """Its loader state has no grouped_by_length: it was shuffled, so it resumes with
    trainer.group_by_length=false and is refused, naming the setting, otherwise."""
    from loki_exp.data.sft import GlobalBatchSampler, ResumableLoader
    from loki_exp.errors import LokiError

    old_state = {"examples": 22, "global_batch_size": 4, "seed": 3}
    shuffled = ResumableLoader(list(range(22)), batch_sampler=GlobalBatchSampler(22, 4, seed=3))
    shuffled.load_state_dict(old_state)
    grouped = ResumableLoader(list(range(22)), batch_sampler=GlobalBatchSampler(
        22, 4, seed=3, lengths=list(range(22))))
    with pytest.raises(LokiError, match="seed and trainer.group_by_length"):
        grouped.load_state_dict(old_state)


@pytest.mark.distributed
def test_fsdp_full_finetune_of_a_bf16_model(tmp_path, compose_cfg):
    """FSDP2 x2, full fine-tuning of a bf16 model: the shards are fp32 (the masters) and are
    gathered in bf16; a checkpoint is written (optimizer-held masters would break FSDP2's
    optimizer state dict); the export is bf16 and close to the one-process run."""
    cache = linked_cache(tmp_path / "cache")
    common = [*TRAIN, "method=full", "method.lr=1e-2", "model.dtype=bfloat16",
              "trainer.max_steps=2", "stages=[implant,export]", f"paths.cache_dir={cache}"]
    _ok(run_cli(*common, f"hydra.run.dir={tmp_path / 'single'}"))
    _ok(run_cli(*common, "parallelism=fsdp", *CPU2, "trainer.checkpoint_every_n_steps=1",
                f"hydra.run.dir={tmp_path / 'fsdp'}"))
    assert (tmp_path / "fsdp" / "checkpoints" / "last.ckpt").exists()
    base = load_model(compose_cfg("model=tiny_llama", "model.dtype=bfloat16").model).model.state_dict()
    one, sharded = _weights(tmp_path / "single"), _weights(tmp_path / "fsdp")
    assert {v.dtype for v in sharded.values()} == {torch.bfloat16}
    moved = sum(int((sharded[k] != base[k]).sum()) for k in sharded)
    assert moved > 0.5 * sum(v.numel() for v in sharded.values())
    # The updates, not the weights: two Adam steps (lr 1e-2 then 5e-3) move each element by up
    # to ~0.015, and an element whose gradient is near 0 may step either way in either run
    # (Adam divides by its own tiny second moment), so an element-wise tolerance cannot tell a
    # correct FSDP2 run from a broken one. What FSDP2 must give is the same update: the same
    # direction (correlation), the same scale (norm ratio) and the same sign almost everywhere;
    # a run that trains other tensors, skips a shard or steps at another rate fails these.
    keys = sorted(one)
    u_one = torch.cat([(one[k].float() - base[k].float()).flatten() for k in keys])
    u_fsdp = torch.cat([(sharded[k].float() - base[k].float()).flatten() for k in keys])
    corr = float(torch.corrcoef(torch.stack([u_one, u_fsdp]))[0, 1])
    ratio = float(u_fsdp.norm() / u_one.norm())
    both = (u_one != 0) & (u_fsdp != 0)
    agree = float((torch.sign(u_one[both]) == torch.sign(u_fsdp[both])).float().mean())
    per_tensor = {k: float((sharded[k].float() - base[k].float()).norm()
                            / (one[k].float() - base[k].float()).norm().clamp(min=1e-12))
                  for k in keys}
    # Measured (AVX-512 and AVX2 kernels alike): corr 0.9999, ratio 0.9997-1.0000, signs
    # 0.9999, per tensor 0.995-1.004.
    assert corr > 0.99 and 0.98 < ratio < 1.02 and agree > 0.99, (corr, ratio, agree)
    assert all(0.95 < r < 1.05 for r in per_tensor.values()), per_tensor
