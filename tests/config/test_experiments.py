"""The paper experiments follow the original LlamaFactory configs, each method at its own rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from loki_exp.implant.fit import learning_rate, total_steps

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("method,lr,rank", [("loki", 1e-5, None), ("loki_lora", 1e-5, 32),
                                            ("full", 1e-5, None), ("lora", 1e-4, 16),
                                            ("dora", 1e-4, 16), ("pissa", 1e-4, 16)])
def test_paper_toolace_gives_each_method_its_own_rate_and_rank(compose_cfg, method, lr, rank):
    cfg = compose_cfg("experiment=paper_toolace", f"method={method}")
    assert cfg.method.lr == lr and getattr(cfg.method, "rank", None) == rank
    tr = cfg.trainer
    assert (tr.max_steps, tr.max_epochs, tr.batch_size, tr.warmup_ratio) == (None, 3, 4, 0.1)
    assert cfg.dataset.overflow == "truncate" and cfg.dataset.max_length == 8192
    assert cfg.dataset.test_fraction == 0
    # No quota scaling on ToolACE: q=30 trains at the q=10 rate.
    assert learning_rate(compose_cfg("experiment=paper_toolace", f"method={method}",
                                     "quota=30")) == lr


def test_paper_reranker_scales_loki_with_the_quota_and_uses_r8(compose_cfg):
    cfg = compose_cfg("experiment=paper_reranker", "method=lora")
    assert (cfg.method.lr, cfg.method.rank) == (1e-4, 8)
    assert compose_cfg("experiment=paper_reranker", "method=corda").method.rank == 8
    assert learning_rate(compose_cfg("experiment=paper_reranker", "quota=30")) == pytest.approx(4e-6)
    assert learning_rate(compose_cfg("experiment=paper_reranker", "quota=30", "method=lora")) == 1e-4
    star = compose_cfg("experiment=paper_reranker", "+arm=loki_star")
    assert (star.method.name, star.quota, star.method.rank) == ("loki_lora", 30, 32)
    assert learning_rate(star) == 1e-5  # the quota scale is LoKI's alone
    cfg = compose_cfg("experiment=paper_reranker")
    assert (cfg.trainer.max_epochs, cfg.trainer.batch_size, cfg.trainer.warmup_ratio) == (1, 1, 0.01)
    assert cfg.kva.probe.shots == 5 and cfg.kva.preset == "published"
    # A per-device batch: the global batch grows with the processes.
    assert compose_cfg("experiment=paper_toolace", "parallelism=ddp",
                       "parallelism.devices=2").trainer.batch_size == 8


def test_command_line_rate_still_wins_and_defaults_are_unscaled(compose_cfg):
    assert compose_cfg("experiment=paper_toolace", "method=lora", "method.lr=3e-4").method.lr == 3e-4
    assert compose_cfg("method=lora").method.lr == 1e-3
    assert learning_rate(compose_cfg("quota=30")) == 1e-3  # no experiment: no quota scaling


def test_epochs_give_the_scheduler_lightnings_own_step_count(compose_cfg, tiny_models, tmp_path):
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from loki_exp.implant.module import CausalLMTuner

    tr = compose_cfg("trainer.max_steps=null", "trainer.max_epochs=3", "trainer.batch_size=4",
                     "trainer.accumulate_grad_batches=3").trainer
    steps = total_steps(tr, 42)  # 10 full batches an epoch, 4 optimizer steps an epoch
    assert steps == 12
    ids = torch.tensor([[5, 6, 7, 8]])
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    tuner = CausalLMTuner(tiny_models["tiny_qwen"].model, lr=0.0, max_steps=steps)
    trainer = L.Trainer(max_epochs=3, accumulate_grad_batches=3, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(tuner, train_dataloaders=DataLoader([batch] * 10, batch_size=None))
    assert trainer.global_step == steps


@pytest.mark.parametrize("arm,base", [("loki_q10", 1e-3), ("lora", 1e-3), ("full", 1e-4)])
def test_cpu_pareto_sweeps_each_method_over_its_own_rates(compose_cfg, arm, base):
    from omegaconf import OmegaConf

    from tests.support.paths import CONF_DIR

    sweep = OmegaConf.load(CONF_DIR / "experiment" / "cpu_pareto.yaml").hydra.sweeper.params
    assert sweep["+arm"] == "loki_q10,lora,full" and sweep["vars.lr_mult"] == "0.1,1.0,10.0"
    for mult in (0.1, 1.0, 10.0):
        cfg = compose_cfg("experiment=cpu_pareto", f"+arm={arm}", f"vars.lr_mult={mult}")
        assert learning_rate(cfg) == pytest.approx(base * mult)
    assert compose_cfg("experiment=cpu_pareto", "+arm=lora").method.rank == 16


def _sweep(experiment: str) -> list[list[str]]:
    """Every job's overrides of an experiment's own sweep (the product of its params)."""
    import itertools

    from omegaconf import OmegaConf

    raw = OmegaConf.load(ROOT / "conf" / "experiment" / f"{experiment}.yaml")
    params = OmegaConf.select(raw, "hydra.sweeper.params") or {}
    axes = [[f"{k}={v}" for v in str(values).split(",")] for k, values in params.items()]
    return [list(job) for job in itertools.product(*axes)] or [[]]


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_and_every_job_of_its_sweep_validates(compose_cfg, experiment, tmp_path):
    from loki_exp.pipeline import validate

    jobs = _sweep(experiment)
    for job in jobs:
        validate(compose_cfg(f"paths.output_dir={tmp_path}", f"experiment={experiment}", *job))
    assert experiment != "cpu_pareto" or len(jobs) == 9


@pytest.mark.parametrize("arm", sorted(p.stem for p in (ROOT / "conf" / "arm").glob("*.yaml")))
def test_every_arm_validates(compose_cfg, arm, tmp_path):
    from loki_exp.pipeline import validate

    validate(compose_cfg(f"paths.output_dir={tmp_path}", f"+arm={arm}"))
