"""One schema checks every group before any stage: unknown keys, types, ranges, choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from loki_exp.config_check import GROUPS, check_config, check_section
from loki_exp.errors import LokiError

CONF = Path(__file__).resolve().parents[2] / "conf"

# (overrides, the whole message); each was accepted, or failed later or elsewhere, before the
# schema (a typo'd key was ignored, a typo'd forgetting metric fell back to acc).
REFUSED = [
    (["+trainer.max_stepz=3"], "trainer.max_stepz is not a known key; expected one of "
     "['max_steps', 'max_epochs', 'batch_size', 'group_by_length', 'accumulate_grad_batches', "
     "'warmup_ratio', "
     "'weight_decay', 'precision', 'log_every_n_steps', 'gradient_clip_val', "
     "'checkpoint_every_n_steps', 'deterministic', 'compile', 'resume_from', 'callbacks', 'lightning']"),
    (["+kva.probe.sampels=3"], "kva.probe.sampels is not a known key; expected one of "
     "['source', 'hub_id', 'samples_per_subject', 'pick', 'seed', 'subjects', 'shots']"),
    (["method=lora", "+method.rnak=8"], "method.rnak is not a known key; expected one of "
     "['name', 'lr', 'rank', 'alpha', 'target_modules']"),
    (["+method.rank=8"], "method.rank is not a known key; expected one of ['name', 'lr']"),
    (["logger=wandb", "+logger.wandb.projekt=x"],
     "logger.wandb.projekt is not an argument of lightning.pytorch.loggers.WandbLogger or "
     "wandb.init"),
    (["logger.csv=true"],
     "logger.csv=true is not a logger spec; the csv logger is on when conf/logger sets it "
     "(logger=csv); false or null leaves it out"),
    (["+logger.csv.flush_logs_every_n_stepz=5"],
     "logger.csv.flush_logs_every_n_stepz is not an argument of "
     "lightning.pytorch.loggers.CSVLogger"),
    (["logger.csv._target_=lightning.pytorch.loggers.NoSuchLogger"],
     "logger.csv._target_='lightning.pytorch.loggers.NoSuchLogger' cannot be imported; "
     "expected the dotted path of a logger class"),
    (["+method_settings.lorra.lr=1"], "method_settings has ['lorra']; expected keys among the "
     "methods ['loki', 'loki_lora', 'lora', 'dora', 'pissa', 'corda', 'full', 'suppress']"),
    (["eval.forgetting_metric=acc_nrom"], "eval.forgetting_metric='acc_nrom' is not known; "
     "expected one of ['acc', 'acc_norm', 'exact_match', 'exact_match_strict', 'pass@1', "
     "'prompt_level_loose_acc', 'prompt_level_strict_acc']"),
    (["logger=wandb", "logger.wandb.mode=on"],
     "logger.wandb.mode='on' is not known; expected one of ['online', 'offline', 'disabled', "
     "'shared']"),
    (["quota=abc"], "quota='abc' must be a number"),
    # OmegaConf alone would convert these, and the stages would read the unconverted value.
    (["quota='10'"], "quota='10' must be a number"),
    (["method.lr='1e-4'"], "method.lr='1e-4' must be a number"),
    (["kva.probe.shots=true"], "kva.probe.shots=True must be an integer"),
    (["+method_settings.lora.rnak=8"], "method_settings.lora.rnak is not a known key; expected "
     "one of ['lr', 'rank', 'alpha', 'target_modules']"),
    (["+quota_lr_scale={quotas: [10, 30]}"], "quota_lr_scale.scales is not set; expected a list"),
    (["+quota_lr_scale={quotas: [10, x], scales: [1, 1]}"],
     "quota_lr_scale.quotas has ['x']: each must be a number"),
    (["quota=150"], "quota=150 must be a number in (0, 100]"),
    (["trainer.max_steps=1.5"], "trainer.max_steps=1.5 must be an integer or null"),
    (["trainer.deterministic=maybe"], "trainer.deterministic='maybe' must be true or false"),
    (["trainer.warmup_ratio=2"], "trainer.warmup_ratio=2 must be a number in [0, 1]"),
    (["eval.limit=0"], "eval.limit=0 must be a positive integer"),
    (["dataset.test_fraction=1"], "dataset.test_fraction=1 must be a number in [0, 1)"),
    (["kva.probe.samples_per_subject=0"], "kva.probe.samples_per_subject=0 must be a positive "
     "integer"),
    (["method.lr=0"], "method.lr=0 must be a positive number"),
    (["dataset=jsonl"], "dataset.path is not set (??? in the config); set it, e.g. "
     "dataset.path=..."),
    (["method.name=adapter"], "method.name='adapter' is not known; expected one of ['loki', "
     "'loki_lora', 'lora', 'dora', 'pissa', 'corda', 'full', 'suppress']"),
    (["model=tiny_llama", "model.config._target_=null"], "model.config._target_=None must be a "
     "dotted class path (package.module.Class)"),
    (["logger.extra=[tensorboard]"], "logger.extra[0]='tensorboard' must be a mapping with a "
     "_target_ (a class path) and its arguments"),
    (["+eval.task_dataset={name: x, source: web}"],
     "eval.task_dataset.source='web' is not known; expected one of ['offline', 'file', 'hub']"),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_a_bad_key_or_value_is_refused_naming_it(compose_raw, overrides, message):
    with pytest.raises(LokiError) as err:
        check_config(compose_raw("paths.output_dir=/tmp/unused", *overrides))
    assert str(err.value) == message


def _options() -> list[tuple[str, str]]:
    return [(group, path.stem) for group in GROUPS if group != "paths"
            for path in sorted((CONF / group).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", _options(), ids=[f"{g}={o}" for g, o in _options()])
def test_every_shipped_group_option_fits_the_schema(compose_raw, group, option, tmp_path):
    extra = {("dataset", "jsonl"): [f"dataset.path={tmp_path}/x.jsonl"],
             ("eval", "paper"): ["eval.allow_code_execution=true"]}.get((group, option), [])
    check_config(compose_raw(f"paths.output_dir={tmp_path}", f"{group}={option}", *extra))


def test_nulls_and_zeros_the_stages_read_as_off_are_accepted(compose_raw):
    check_config(compose_raw("paths.output_dir=/tmp/unused", "eval.bpb_limit=null",
                             "eval.drift_prompts=null", "eval.bpb=null", "trainer.callbacks=null",
                             "logger.extra=null", "trainer.gradient_clip_val=0"))


def test_free_keys_live_only_under_vars(compose_raw):
    check_config(compose_raw("paths.output_dir=/tmp/unused", "+vars.my_axis=3"))
    with pytest.raises(LokiError, match=r"^my_axis is not a known key; expected one of \['quota'"):
        check_config(compose_raw("paths.output_dir=/tmp/unused", "+my_axis=3"))


def test_a_group_alone_and_the_checked_values(compose_raw):
    """``check_section`` is what a library caller runs on a group it composed; it returns
    the typed values, converted as OmegaConf converts them."""
    lora = check_section("method", compose_raw("method=lora", "method.rank=8").method)
    assert (type(lora).__name__, lora.rank, lora.lr, lora.target_modules) == (
        "PeftLoraSettings", 8, 1e-3, "all-linear")
    only = compose_raw("kva.engine=warp")
    check_config(only, groups=("trainer",))  # the kva group is not looked at
    with pytest.raises(LokiError, match=r"^kva.engine='warp' is not known"):
        check_config(only, groups=("kva",))


def test_the_checked_config_is_typed_with_every_default_filled_in(compose_raw):
    """What the stages receive: dataclasses with the schema's defaults, values typed as their
    fields (a quota written 10 is the number 10.0), the composed config kept for records."""
    from loki_exp.config_schema import Eval, OfflineDataset, RunConfig, Trainer

    raw = compose_raw("paths.output_dir=/tmp/unused", "~dataset.overflow")
    assert "overflow" not in raw.dataset
    cfg = check_config(raw)
    assert isinstance(cfg, RunConfig)
    assert (type(cfg.dataset), type(cfg.trainer), type(cfg.eval)) == (OfflineDataset, Trainer, Eval)
    assert cfg.dataset.overflow == "drop" and cfg.quota == 10.0 and isinstance(cfg.quota, float)
    assert type(cfg.method).__name__ == "MethodSettings" and cfg.method.lr == 1e-3
    assert isinstance(cfg.eval.bpb, list) and isinstance(cfg.stages, list)
    assert cfg.record()["quota"] == 10 and cfg.composed is raw


def test_a_task_dataset_is_checked_into_its_shape(compose_raw):
    cfg = check_config(compose_raw("paths.output_dir=/tmp/unused",
                                   "+eval.task_dataset={name: bfcl, source: offline}"))
    assert type(cfg.eval.task_dataset).__name__ == "OfflineDataset"
    assert cfg.eval.task_dataset.max_length == 1024
