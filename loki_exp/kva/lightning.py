"""KVA under Lightning: the probe DataModule, the attribution module run by
``trainer.predict``, and the callback that writes each finished sample to the store.

Under DDP every rank predicts a disjoint shard of the remaining probe indices and writes its
own shard file; duplicates that a distributed sampler may pad in are dropped by index when
the shards are merged.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from loki_exp.kva.engine import KVASettings, build_engine
from loki_exp.kva.store import ShardWriter, partial_dir
from loki_exp.model_access import node_grid

log = logging.getLogger(__name__)


def _as_list(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows  # prompts are tokenised one by one in predict_step: no padding, no collation


class ProbeDataModule(L.LightningDataModule):
    """Rendered probe prompts still to attribute: dicts of index, sample_id, prompt."""

    def __init__(self, items: list[dict[str, Any]], batch_size: int = 1):
        super().__init__()
        self.items = items
        self.batch_size = batch_size

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=False,
                          collate_fn=_as_list)


class KVAModule(L.LightningModule):
    """Attributes the prompts of a batch: the published (last-position) definition as one
    padded batch, the all-positions one prompt by prompt (its m points are batched)."""

    def __init__(self, model: torch.nn.Module, tokenizer, settings: KVASettings,
                 shared_prefix: list[int] | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.engine = build_engine(model, settings)
        self.shared_prefix = shared_prefix

    def on_predict_start(self) -> None:
        if self.shared_prefix and hasattr(self.engine, "set_shared_prefix"):
            self.engine.set_shared_prefix(torch.tensor(self.shared_prefix, device=self.device))

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        start = time.perf_counter()
        prompts = [self.tokenizer(row["prompt"], return_tensors="pt",
                                  add_special_tokens=False).input_ids[0].to(self.device)
                   for row in batch]
        with torch.enable_grad():
            if len(prompts) > 1 and hasattr(self.engine, "attribute_batch"):
                attrs = self.engine.attribute_batch(prompts)  # one padded batch (kva.batch_size)
            else:
                attrs = [self.engine(ids.view(1, -1)) for ids in prompts]
        seconds = (time.perf_counter() - start) / len(batch)
        return [{**row, "scores": attr.scores.cpu().numpy(), "target_token": attr.target_token,
                 "target_prob": attr.target_prob, "seconds": seconds}
                for row, attr in zip(batch, attrs)]


def common_prefix(token_lists: list[list[int]]) -> list[int]:
    """The token ids every probe prompt starts with (chat template + instruction)."""
    if not token_lists:
        return []
    first, n = token_lists[0], min(len(t) for t in token_lists)
    size = next((i for i in range(n) if any(t[i] != first[i] for t in token_lists)), n)
    return first[:size]


class KVAStoreWriter(BasePredictionWriter):
    """Appends every finished sample to this rank's shard of the store, as it finishes."""

    def __init__(self, final_path: Path, store_dtype: str = "float32"):
        super().__init__(write_interval="batch")
        self.final_path = final_path
        self.store_dtype = store_dtype
        self.shard: ShardWriter | None = None
        self.seconds: list[float] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: KVAModule) -> None:
        n_layers, n_nodes = node_grid(pl_module.model)
        # Unique per attempt: a rerun must never open (and truncate) an earlier shard.
        tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-rank{trainer.global_rank}"
        self.shard = ShardWriter(partial_dir(self.final_path) / f"{tag}.h5", n_layers, n_nodes,
                                 self.store_dtype)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx, dataloader_idx=0) -> None:
        for row in prediction:
            self.shard.append(row["index"], row["sample_id"], row["prompt"], row["scores"],
                              row["target_token"], row["target_prob"])
            self.seconds.append(row["seconds"])
        if len(self.seconds) % 10 == 0:
            log.info("KVA rank %d: %d samples, %.2f s/sample", trainer.global_rank,
                     len(self.seconds), sum(self.seconds) / len(self.seconds))

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.shard is not None:
            self.shard.close()
        if self.seconds:
            log.info("KVA rank %d done: %d samples, %.2f s/sample", trainer.global_rank,
                     len(self.seconds), sum(self.seconds) / len(self.seconds))

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.shard is not None:
            self.shard.close()
