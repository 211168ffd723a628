"""Chat SFT examples -> token ids with the loss on the assistant turns only, and the DataModule.

An example is a conversation: earlier turns (system, user, assistant, tool) and a final
assistant response. It is rendered with the model's chat template, and every assistant turn
is trained, each through its end-of-turn token, while system, user and tool turns stay
masked (-100), as LlamaFactory's ShareGPT format does. Each turn is tokenised on its own and
the pieces concatenated, so a turn boundary never merges into one token.

An example longer than ``max_length`` is dropped and counted (``overflow=drop``: cutting the
target would teach a broken answer), or cut to its first ``max_length`` tokens
(``overflow=truncate``, what LlamaFactory's ``cutoff_len`` does to long conversations; it
splits the budget between prompt and answer turn by turn, we keep the head).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from loki_exp.errors import LokiError
from loki_exp.upstream import batches_processed

log = logging.getLogger(__name__)

IGNORE = -100
OVERFLOW = ("drop", "truncate")


@dataclass
class Example:
    id: str
    messages: list[dict[str, str]]  # the turns before the response (may hold assistant turns)
    response: str
    category: str = "all"  # what the run's data counts are kept by (a BFCL category)


def chat_segments(tokenizer, conversation: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: each assistant turn's
    content and end-of-turn marker is trained, everything else is not."""
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    segments, pos = [], 0
    for i, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(conversation[:i], add_generation_prompt=True,
                                                  tokenize=False))
        end_text = tokenizer.apply_chat_template(conversation[:i + 1], tokenize=False).rstrip()
        if not full.startswith(end_text) or start < pos or start > len(end_text):
            raise LokiError("the chat template does not render a conversation as the sum of its "
                            "turns (an earlier turn changes when later ones follow); multi-turn "
                            "labels need a template that does")
        segments += [(full[pos:start], False), (full[start:len(end_text)], True)]
        pos = len(end_text)
    # What follows the last assistant turn (a newline) is neither trained nor needed.
    return [(text, trained) for text, trained in segments if text]


def check_overflow(overflow: str) -> None:
    if overflow not in OVERFLOW:
        raise LokiError(f"dataset.overflow={overflow!r} is not known; expected one of {list(OVERFLOW)}")


def encode(tokenizer, example: Example, max_length: int,
           overflow: str = "drop") -> dict[str, list[int]] | None:
    check_overflow(overflow)
    conversation = [*example.messages, {"role": "assistant", "content": example.response}]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in chat_segments(tokenizer, conversation):
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if len(ids) > max_length:
        if overflow == "drop":
            return None
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            return None  # nothing left to learn from
        return {"input_ids": ids, "labels": labels, "truncated": True}
    return {"input_ids": ids, "labels": labels}


@dataclass
class EncodedCounts:
    """Per category: examples given, dropped for exceeding ``max_length`` (or cut to nothing
    to learn), and cut short (``overflow=truncate``)."""
    examples: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {c: {"examples": n, "kept": n - self.dropped[c], "dropped": self.dropped[c],
                    "truncated": self.truncated[c]} for c, n in sorted(self.examples.items())}

    def lost_shares(self) -> dict[str, float]:
        """Per category that lost any, the share dropped or cut."""
        return {c: (self.dropped[c] + self.truncated[c]) / n for c, n in self.examples.items()
                if self.dropped[c] + self.truncated[c]}


def encode_all(tokenizer, examples: list[Example], max_length: int,
               overflow: str = "drop") -> tuple[list[dict], EncodedCounts]:
    """Encoded examples and, per category, how many were dropped or cut by ``max_length``."""
    counts = EncodedCounts()
    kept = []
    for ex in examples:
        counts.examples[ex.category] += 1
        enc = encode(tokenizer, ex, max_length, overflow)
        if enc is None:
            counts.dropped[ex.category] += 1
            continue
        if enc.pop("truncated", False):
            counts.truncated[ex.category] += 1
        kept.append(enc)
    return kept, counts


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-sequence token (what pads always mean here:
    positions masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> int:
    """Leading tokens that every row of a (right-padded) batch has (a task's system prompt:
    BFCL's 92 of ~400), up to the first position whose logits score a labelled token."""
    same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(0)
    common = int(same.int().cumprod(0).sum())
    labelled = (labels != IGNORE).any(0).nonzero()
    first_label = int(labelled[0]) if len(labelled) else labels.shape[1]
    return max(0, min(common, first_label - 1, labels.shape[1] - 1))


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

    With ``lengths`` the batches are grouped by length (less padding, the same examples per
    epoch): the epoch's shuffled order (seed + epoch) is cut into windows of ``GROUP`` global
    batches, each window sorted by length and cut into batches, and the batches shuffled
    (the same generator). As Hugging Face's ``LengthGroupedSampler`` does with its mega-batches;
    written here because that one knows nothing of the global batch and the rank slices.
    """

    GROUP = 64  # global batches per sorted window: 256 examples at batch 4

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 lengths: list[int] | None = None):
        if batch_size % world_size:
            raise LokiError(f"trainer.batch_size={batch_size} is the global batch and must split "
                            f"evenly over {world_size} processes")
        if n < batch_size:
            raise LokiError(f"{n} training examples are fewer than trainer.batch_size={batch_size}")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.lengths = lengths
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (the same at every rank and world size)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        size = self.batch_size
        order = torch.randperm(self.n, generator=generator).tolist()[:len(self) * size]
        if self.lengths is None:
            return [order[k * size:(k + 1) * size] for k in range(len(self))]
        batches = []
        for start in range(0, len(order), size * self.GROUP):
            window = sorted(order[start:start + size * self.GROUP], key=lambda i: -self.lengths[i])
            batches += [window[j:j + size] for j in range(0, len(window), size)]
        return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        local = self.batch_size // self.world_size
        batches = self.global_batches()
        for k in range(self.skip, len(batches)):
            yield batches[k][self.rank * local:(self.rank + 1) * local]
        self.skip = 0  # only the first epoch after a resume is partial


def real_token_share(batches: list[list[int]], lengths: list[int], world_size: int = 1) -> float:
    """Real tokens over padded ones in these global batches (each rank pads its own slice)."""
    local = len(batches[0]) // world_size
    real = padded = 0
    for batch in batches:
        for r in range(world_size):
            part = [lengths[i] for i in batch[r * local:(r + 1) * local]]
            real += sum(part)
            padded += len(part) * max(part)
    return real / padded


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints: its state names the data (examples, global
    batch, seed), so a resume on other data fails clearly instead of training on a mix. The
    position within the epoch is the fit loop's own progress (``GlobalBatchSampler.skip``)."""

    def state_dict(self) -> dict[str, int]:
        s = self.batch_sampler
        return {"examples": s.n, "global_batch_size": s.batch_size, "seed": s.seed,
                "grouped_by_length": int(s.lengths is not None)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        state = {"grouped_by_length": 0, **state}  # checkpoints from before the grouping
        if state != self.state_dict():
            raise LokiError(f"the checkpoint was trained on data {state}, this run has "
                            f"{self.state_dict()}: resume with the same dataset, batch size, "
                            "seed and trainer.group_by_length")


class SFTDataModule(L.LightningDataModule):
    """Training batches for ``trainer.fit``; build the Trainer with ``use_distributed_sampler=False``
    (the sampler here does the rank split)."""

    def __init__(self, train: list[dict[str, Any]], batch_size: int, pad_id: int, seed: int = 0,
                 group_by_length: bool = False):
        super().__init__()
        self.train = train
        self.batch_size = batch_size
        self.collate = PadCollator(pad_id)
        self.seed = seed
        self.group_by_length = group_by_length

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        lengths = [len(r["input_ids"]) for r in self.train]
        sampler = GlobalBatchSampler(len(self.train), self.batch_size, rank, world, self.seed,
                                     lengths if self.group_by_length else None)
        if rank == 0:
            shares = {name: real_token_share(GlobalBatchSampler(
                len(self.train), self.batch_size, 0, world, self.seed, by).global_batches(),
                lengths, world) for name, by in (("grouped", lengths), ("shuffled", None))}
            log.info("training batches: %.1f%% of the tokens are real grouped by length, %.1f%% "
                     "shuffled (trainer.group_by_length=%s)", 100 * shares["grouped"],
                     100 * shares["shuffled"], self.group_by_length)
        if trainer is not None:  # resumed mid-epoch: continue after the batches already trained
            sampler.skip = batches_processed(trainer)
            sampler.epoch = trainer.current_epoch
            if sampler.skip:
                log.info("resumed in epoch %d: skipping its %d batches already trained",
                         sampler.epoch, sampler.skip)
        return ResumableLoader(self.train, batch_sampler=sampler, collate_fn=self.collate)
