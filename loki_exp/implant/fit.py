"""The implant stage: prepare the method's trainable parameters and fit with Lightning."""

from __future__ import annotations

import logging
import math
import pickle
import re
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from torch import nn
from torch.distributed.tensor import DTensor

from loki_exp.callbacks import user_callbacks
from loki_exp.data.sft import EncodedCounts, SFTDataModule, encode_all, pad_id
from loki_exp.data.tasks import TaskData
from loki_exp.errors import LokiError
from loki_exp.implant import methods
from loki_exp.implant.compiled import compiled_layers
from loki_exp.implant.loki_linear import trainable_parameters
from loki_exp.implant.module import CausalLMTuner, is_fsdp_sharded
from loki_exp.implant.run_identity import check_resume, run_identity
from loki_exp.models import LoadedModel, load_model
from loki_exp.parallel import lightning_strategy
from loki_exp.progress import progress_callbacks

if TYPE_CHECKING:
    from loki_exp.config_schema import RunConfig, Trainer

log = logging.getLogger(__name__)


def learning_rate(cfg: RunConfig) -> float:
    """method.lr, scaled with the quota where the method says so (``loki``: not LoKI*,
    ``implant/methods/loki.py``) and the experiment sets ``quota_lr_scale`` (the paper's
    reranker runs: q=30 at 0.4x the q=10 rate)."""
    if not methods.get(cfg.method.name).quota_scales_lr or cfg.quota_lr_scale is None:
        return cfg.method.lr
    scale = np.interp(cfg.quota, cfg.quota_lr_scale.quotas, cfg.quota_lr_scale.scales)
    return cfg.method.lr * float(scale)  # a numpy float -> the run record's plain float


def build_trainer(cfg: RunConfig, output_dir: Path, loggers: list,
                  extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    par, tr = cfg.parallelism, cfg.trainer
    every = tr.checkpoint_every_n_steps
    # 0 means no checkpoints at all: a sweep of full fine-tunes would otherwise write a
    # model-plus-optimizer last.ckpt (1.6 GB for SmolLM2) per job that the export makes moot.
    checkpoints = [ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True,
                                   save_top_k=0, every_n_train_steps=every)] if every else []
    bar, lines = progress_callbacks("implant")  # a bar on a terminal, plain lines in a log
    callbacks = [*checkpoints, *lines, *extra_callbacks, *user_callbacks(tr.callbacks)]
    ours = dict(enable_progress_bar=bar,
        # Off only when no checkpoint callback is given at all (Lightning would add its own);
        # a user's ModelCheckpoint in trainer.callbacks still works with every=0.
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        accelerator=par.accelerator, devices=par.devices, num_nodes=par.num_nodes,
        strategy=lightning_strategy(par), use_distributed_sampler=False,  # SFTDataModule splits
        precision=tr.precision, max_steps=-1 if tr.max_steps is None else tr.max_steps,
        max_epochs=tr.max_epochs,
        accumulate_grad_batches=tr.accumulate_grad_batches,
        gradient_clip_val=tr.gradient_clip_val, log_every_n_steps=tr.log_every_n_steps,
        logger=loggers,  # the logger group's (loggers.build_loggers)
        callbacks=callbacks,
        deterministic=tr.deterministic,
        default_root_dir=output_dir,
    )
    spec = tr.lightning or {"_target_": "lightning.pytorch.Trainer"}
    # partial: the user's flags through Hydra, ours (objects: strategy, loggers, callbacks)
    # passed as they are, never copied into a config.
    return instantiate(spec, _partial_=True)(**ours)


def total_steps(tr: Trainer, n_train: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``max_epochs`` x the steps of an epoch
    (its full global batches, an incomplete last one dropped, over gradient accumulation;
    Lightning steps on an epoch's last batch even mid-accumulation)."""
    if tr.max_steps is not None:
        return tr.max_steps
    batches = n_train // tr.batch_size
    if batches < 1:
        raise LokiError(f"{n_train} training examples are fewer than trainer.batch_size={tr.batch_size}")
    return tr.max_epochs * math.ceil(batches / tr.accumulate_grad_batches)


def resume_checkpoint(cfg: RunConfig, output_dir: Path) -> str | None:
    """``trainer.resume_from``: null (start fresh), "last" (this run dir's last checkpoint,
    e.g. after the job was killed; rerun with the same ``hydra.run.dir``) or a path."""
    resume = cfg.trainer.resume_from
    if resume is None:
        return None
    if resume == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise LokiError(f"trainer.resume_from=last: no checkpoint at {last}; rerun with the "
                            "killed run's hydra.run.dir, or pass a checkpoint path")
        return str(last)
    if not Path(resume).is_file():
        raise LokiError(f"trainer.resume_from={resume!r}: no such checkpoint file")
    return check_checkpoint(resume)


def check_checkpoint(path: str | Path) -> str:
    """Refuse a file that is not a checkpoint, or that would need arbitrary unpickling
    (``weights_only=True``), before any stage runs; mmap reads no tensor data."""
    if not zipfile.is_zipfile(path):
        raise LokiError(f"trainer.resume_from={str(path)!r} is not a PyTorch checkpoint (.ckpt)")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "objects beyond tensors and plain data"
        raise LokiError(f"trainer.resume_from={str(path)!r} holds {what}; refused, checkpoints "
                        "are loaded with weights_only=True") from None
    return str(path)


def unsharded_copy(cfg: RunConfig, sharded: nn.Module, positions: list[list[int]] | None) -> nn.Module:
    """After FSDP2 training the model holds DTensor shards; export and evaluation want a
    plain model. Gather every trained tensor (all ranks take part) into a fresh copy of the
    base model prepared the same way."""
    trained = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
               for name, p in sharded.named_parameters() if p.requires_grad}
    fresh = load_model(cfg.model, cfg.paths.cache_dir).model  # in model.dtype, as trained
    model = methods.prepare(cfg.method, fresh, positions, like=sharded)
    missing = set(trained) - {name for name, _ in model.named_parameters()}
    if missing:
        raise RuntimeError(f"trained tensors without a place in the fresh model: {sorted(missing)[:5]}")
    model.load_state_dict(trained, strict=False)
    return model


# A category that loses more than this share of its examples to max_length is named in a
# warning (README "Task data"): a silent loss once took 120 of 166 `multiple` examples.
LOSS_WARNING_SHARE = 0.05


def warn_data_loss(task: str, counts: EncodedCounts, max_length: int, overflow: str) -> None:
    if counts.total_dropped:
        log.info("%s: %d of %d training examples longer than max_length=%d dropped (overflow=%s)",
                 task, counts.total_dropped, sum(counts.examples.values()), max_length, overflow)
    lost = counts.lost_shares()
    if any(share > LOSS_WARNING_SHARE for share in lost.values()):
        log.warning("%s: max_length=%d %s more than %.0f%% of a category's training examples "
                    "(%s); raise dataset.max_length", task, max_length,
                    "drops" if overflow == "drop" else "cuts", 100 * LOSS_WARNING_SHARE,
                    ", ".join(f"{c} {share:.0%}" for c, share in sorted(lost.items())))


def run_implant(cfg: RunConfig, loaded: LoadedModel, positions: list[list[int]] | None,
                task: TaskData, output_dir: Path, loggers: list,
                callbacks: list[L.Callback] = ()) -> dict[str, Any]:
    if not methods.get(cfg.method.name).trains:  # suppress: an edit, no training
        loaded.model = methods.prepare(cfg.method, loaded.model, positions)
        return {"trainable_parameters": 0, "edited_rows": sum(map(len, positions or []))}
    overflow, max_length = cfg.dataset.overflow, cfg.dataset.max_length
    train, counts = encode_all(loaded.tokenizer, task.train, max_length, overflow)
    warn_data_loss(task.name, counts, max_length, overflow)
    if not train:
        raise LokiError(f"dataset {task.name}: no training example fits max_length="
                        f"{cfg.dataset.max_length}")
    # Seeded before the adapters are initialised: every rank must build the same LoRA A/B
    # (FSDP2 shards each rank's own copy; nothing broadcasts rank 0's), and runs repeat.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = methods.prepare(cfg.method, loaded.model, positions, loaded=loaded,
                            cache_dir=cfg.paths.cache_dir)
    loaded.model = model
    n_trainable = trainable_parameters(model)
    lr = learning_rate(cfg)
    log.info("implant: method=%s, %d trainable parameters, lr=%.3g, %d train examples "
             "(%d test held out)", cfg.method.name, n_trainable, lr, len(train), len(task.test))
    identity = run_identity(cfg.method.name, positions, loaded.fingerprint, train)
    resume = resume_checkpoint(cfg, output_dir)
    check_resume(resume, identity)
    tuner = CausalLMTuner(model, lr=lr, max_steps=total_steps(cfg.trainer, len(train)),
                          warmup_ratio=cfg.trainer.warmup_ratio,
                          weight_decay=cfg.trainer.weight_decay, identity=identity)
    data = SFTDataModule(train, cfg.trainer.batch_size,
                         pad_id(loaded.tokenizer),
                         seed=cfg.seed, group_by_length=cfg.trainer.group_by_length)
    trainer = build_trainer(cfg, output_dir, loggers, callbacks)
    compiled = (compiled_layers(model, tuner.lm,
                                eager_attention=isinstance(trainer.accelerator, CPUAccelerator))
                if cfg.trainer.compile else nullcontext())
    with compiled:
        trainer.fit(tuner, datamodule=data, ckpt_path=resume,
                    weights_only=True)  # a checkpoint never needs arbitrary unpickling
    if is_fsdp_sharded(tuner.lm):
        loaded.model = unsharded_copy(cfg, tuner.model, positions)
    loss = trainer.callback_metrics.get("train/loss")
    return {"trainable_parameters": n_trainable, "lr": lr, "train_examples": len(train),
            "test_examples": len(task.test), "dropped_too_long": counts.total_dropped,
            "data_by_category": counts.as_dict(), "skipped_rows": task.skipped,
            "final_train_loss": None if loss is None else float(loss)}
