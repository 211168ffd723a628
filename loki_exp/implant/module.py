"""Causal-LM SFT as a LightningModule, shared by LoKI and every baseline method.

Only the trainable parameters reach the optimizer (so LoKI's optimizer state is the
selected rows only). The loss covers response tokens only, and ``lm_head`` runs on those
positions alone: with a 49k-152k vocabulary it is a large share of the step, and prompt
positions never contribute to the loss.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers.cache_utils import DynamicCache

from loki_exp.data.sft import IGNORE, shared_prefix
from loki_exp.implant import run_identity
from loki_exp.implant.master_weights import MasterWeights
from loki_exp.model_access import decoder_layers, output_logits


def is_fsdp_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _has_dropout(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "attention_dropout", 0.0)) or any(
        isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


class ResponseLM(nn.Module):
    """A causal LM whose forward returns the summed response-token loss and the token count.

    The loss is one forward of this module, not calls into the model's submodules from
    outside, so that FSDP2's root hooks gather the embeddings, final norm and lm_head.
    The batch's shared prefix runs once: its keys and values are repeated for every row
    (autograd sums their gradients back), the rest continues from them with its own
    positions. The same loss and gradients (tests/implant/test_response_loss.py), fewer
    tokens. Not under FSDP2 (each layer would be gathered twice) nor with dropout (the rows
    would share its noise on the prefix).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.share_prefix = not _has_dropout(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.model.get_decoder()
        shared = (shared_prefix(input_ids, attention_mask, labels)
                  if self.share_prefix and len(input_ids) > 1 and not is_fsdp_sharded(self)
                  else 0)
        if shared:
            cache = DynamicCache(config=self.model.config)
            decoder(input_ids=input_ids[:1, :shared], cache=cache, use_cache=True)
            cache.batch_repeat_interleave(len(input_ids))
            positions = torch.arange(shared, input_ids.shape[1], device=input_ids.device)
            hidden = decoder(input_ids=input_ids[:, shared:], attention_mask=attention_mask,
                             position_ids=positions.expand(len(input_ids), -1), cache=cache,
                             use_cache=True).last_hidden_state
            labels = labels[:, shared:]
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = output_logits(self.model, hidden[:, :-1][keep])
        total = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return total, keep.sum()


class CausalLMTuner(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float, max_steps: int, warmup_ratio: float = 0.1,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 identity: dict[str, str] | None = None):
        super().__init__()
        # What this run trains (implant/run_identity.py): saved with every checkpoint.
        self.identity = identity
        self.lm = ResponseLM(model)
        self.lr = lr
        self.max_steps = max_steps
        self.warmup_steps = int(warmup_ratio * max_steps)
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        # Checkpoints hold only the trained tensors (see on_save_checkpoint).
        self.strict_loading = False
        self.masters: MasterWeights | None = None  # built with the optimizer
        self._saved_masters: dict[str, torch.Tensor] | None = None  # from a resumed checkpoint

    @property
    def model(self) -> nn.Module:
        return self.lm.model

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy: shard each decoder layer, then the
        rest (embeddings, norm, lm_head) as the root unit; other strategies need nothing."""
        if not isinstance(self.trainer.strategy, ModelParallelStrategy) or is_fsdp_sharded(self.lm):
            return
        mesh = self.device_mesh["data_parallel"]
        # fp32 masters the FSDP2 way: trainable low-precision parameters become fp32 shards
        # that are gathered in the model's dtype for compute (MixedPrecisionPolicy), so no
        # optimizer-held masters are needed (they would not be model parameters, which
        # FSDP2's optimizer state dict requires).
        trainable = [p for p in self.lm.parameters() if p.requires_grad]
        low = {p.dtype for p in trainable} - {torch.float32}
        policy = MixedPrecisionPolicy()
        if low:
            for param in trainable:
                param.data = param.data.float()
            policy = MixedPrecisionPolicy(param_dtype=low.pop(), reduce_dtype=torch.float32)
        for layer in decoder_layers(self.model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(self.lm, mesh=mesh, mp_policy=policy)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the trainable tensors only: for LoKI a few MB instead of the whole model
        (the frozen weights are the base checkpoint's); full fine-tuning keeps everything."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trainable}
        if self.masters:
            checkpoint["fp32_master_weights"] = self.masters.state_dict()
        if self.identity is not None:
            checkpoint[run_identity.KEY] = dict(self.identity)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Single process / DDP restore this before configure_optimizers builds the masters,
        # so they resume at full precision (under FSDP2 the fp32 shards are the masters).
        self._saved_masters = checkpoint.get("fp32_master_weights")
        if self.identity is not None:  # run_implant checks first; this guards direct use
            diff = run_identity.differences(checkpoint.get(run_identity.KEY), self.identity)
            if diff:
                raise run_identity.refusal("<checkpoint>", diff, checkpoint.get(run_identity.KEY))

    def on_fit_start(self) -> None:
        # Models are loaded in eval mode; Lightning keeps the submodule modes it finds.
        self.model.train()

    def response_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over this batch's response tokens."""
        total, count = self.lm(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return total / count.clamp(min=1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, count = self.lm(batch["input_ids"], batch["attention_mask"], batch["labels"])
        # Normalise by the response tokens of the whole global batch (all ranks), times the
        # world size that DDP/FSDP's gradient averaging divides by again: the step's gradient
        # is then the token mean over the global batch, the same as one process computes.
        world = self.trainer.world_size
        tokens = self.trainer.strategy.reduce(count.float(), reduce_op="sum") if world > 1 else count
        loss = total * world / tokens.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, sync_dist=world > 1,
                 batch_size=batch["input_ids"].shape[0])
        return loss

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """What the optimizer updates, by parameter name: the fp32 master where there is one."""
        masters = self.masters.state_dict() if self.masters else {}
        return {name: masters.get(f"lm.model.{name}", p.detach())
                for name, p in self.model.named_parameters() if p.requires_grad}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if not self.masters:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        def closure():
            # Right after the step's last backward (DDP has reduced the accumulated
            # gradients), before the AMP scaler unscales and Lightning clips what the
            # optimizer holds: the masters.
            result = optimizer_closure()
            self.masters.grads_to_masters()
            return result

        super().optimizer_step(epoch, batch_idx, optimizer, closure)
        self.masters.masters_to_model()

    def configure_optimizers(self) -> dict[str, Any]:
        named = [(f"lm.model.{n}", p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.masters = MasterWeights(named, self._saved_masters)
        params = self.masters.optimizer_params([p for _, p in named])
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas,
                                      weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_with_warmup(s, self.warmup_steps, self.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
