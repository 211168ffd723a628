"""Chat SFT examples -> token ids with the loss on the response only, and the DataModule.

An example is a prompt (chat messages) and a response. The prompt is rendered with the
model's chat template and the generation prompt; the labels are -100 on the prompt and the
response's ids plus the end-of-turn token. An example longer than ``max_length`` is dropped
and counted, never truncated (cutting the target would teach a broken answer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from loki_exp.errors import LokiError

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Example:
    id: str
    messages: list[dict[str, str]]  # the prompt turns
    response: str


def encode(tokenizer, example: Example, max_length: int) -> dict[str, list[int]] | None:
    prompt = tokenizer.apply_chat_template(example.messages, add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    end = tokenizer.eos_token or ""
    response_ids = tokenizer(example.response + end, add_special_tokens=False).input_ids
    if len(prompt_ids) + len(response_ids) > max_length:
        return None
    return {"input_ids": prompt_ids + response_ids,
            "labels": [IGNORE] * len(prompt_ids) + response_ids}


def encode_all(tokenizer, examples: list[Example], max_length: int) -> tuple[list[dict], int]:
    """Encoded examples and the number dropped for exceeding ``max_length``."""
    encoded = [encode(tokenizer, ex, max_length) for ex in examples]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


class PadCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class GlobalBatchSampler(Sampler[list[int]]):
    """Shuffled global batches of ``batch_size`` examples; each rank takes its contiguous slice.

    Written by hand because torch's DistributedSampler interleaves ranks (rank r takes every
    world-th index) and pads the epoch, so under DDP step k would see other examples than
    one process does. Here step k trains on the same examples at any world size, and DDP
    training equals single-process training. An incomplete last batch is dropped, so every
    step has the same global batch. ``skip`` starts the epoch after the batches a resumed
    run already trained on.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size % world_size:
            raise LokiError(f"trainer.batch_size={batch_size} is the global batch and must split "
                            f"evenly over {world_size} processes")
        if n < batch_size:
            raise LokiError(f"{n} training examples are fewer than trainer.batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        local = self.batch_size // self.world_size
        for k in range(self.skip, len(self)):
            start = k * self.batch_size + self.rank * local
            yield order[start:start + local].tolist()
        self.skip = 0  # only the first epoch after a resume is partial


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints: its state names the data (examples, global
    batch, seed), so a resume on other data fails clearly instead of training on a mix. The
    position within the epoch is the fit loop's own progress (``GlobalBatchSampler.skip``)."""

    def state_dict(self) -> dict[str, int]:
        s = self.batch_sampler
        return {"examples": s.n, "global_batch_size": s.batch_size, "seed": s.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state != self.state_dict():
            raise LokiError(f"the checkpoint was trained on data {state}, this run has "
                            f"{self.state_dict()}: resume with the same dataset, batch size and seed")


class SFTDataModule(L.LightningDataModule):
    """Training batches for ``trainer.fit``; build the Trainer with ``use_distributed_sampler=False``
    (the sampler here does the rank split)."""

    def __init__(self, train: list[dict[str, Any]], batch_size: int, pad_id: int, seed: int = 0):
        super().__init__()
        self.train = train
        self.batch_size = batch_size
        self.collate = PadCollator(pad_id)
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = GlobalBatchSampler(len(self.train), self.batch_size, rank, world, self.seed)
        if trainer is not None:  # resumed mid-epoch: continue after the batches already trained
            # processed, not completed: a step-end checkpoint is written before "completed"
            # counts its batch.
            sampler.skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            sampler.epoch = trainer.current_epoch
            if sampler.skip:
                log.info("resumed in epoch %d: skipping its %d batches already trained",
                         sampler.epoch, sampler.skip)
        return ResumableLoader(self.train, batch_sampler=sampler, collate_fn=self.collate)
