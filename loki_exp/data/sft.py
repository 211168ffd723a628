"""Chat SFT examples -> token ids with the loss on the response only, and the DataModule.

An example is a prompt (chat messages) and a response. The prompt is rendered with the
model's chat template and the generation prompt; the labels are -100 on the prompt and the
response's ids plus the end-of-turn token. An example longer than ``max_length`` is dropped
and counted, never truncated (cutting the target would teach a broken answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

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


class SFTDataModule(L.LightningDataModule):
    def __init__(self, train: list[dict[str, Any]], batch_size: int, pad_id: int, seed: int = 0):
        super().__init__()
        self.train = train
        self.batch_size = batch_size
        self.collate = PadCollator(pad_id)
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          collate_fn=self.collate, generator=generator, drop_last=False)
