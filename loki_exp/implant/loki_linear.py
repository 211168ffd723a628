"""The LoKI module: a down_proj whose selected rows train and whose other rows stay frozen.

Like a peft tuner, ``LoKILinear`` keeps the original Linear as ``base_layer`` and adds only
the trainable tensors: ``weight_rows`` [k, d_ff] (and ``bias_rows``), or for LoKI* the
low-rank factors of ``W_S = W_S0 + A B``. ``apply_loki`` swaps them in and freezes the rest;
``merge_loki`` writes the rows back and returns plain Linears.

Why a custom autograd function (no library offers a row-subset Linear): the forward is
literally ``F.linear(x, W)`` with ``W`` the base weight holding the current rows, so it is
bit-identical to the restored Linear; the backward computes the weight gradient for the
``k`` selected rows only (``grad_out[..., rows]^T x``), never a full [d_model, d_ff]
gradient, and no weight copy is kept for autograd. The optimizer sees only the rows.

Precision: the trainable tensors are fp32 whatever the model's dtype (they are the master
copy; the base weight in the model's dtype is the working copy the forward reads), as
LlamaFactory's AMP / DeepSpeed ZeRO-2 keep fp32 masters of a bf16 model: an AdamW step at lr
1e-5 on rows held in bf16 would leave most of their entries unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loki_exp.errors import LokiError
from loki_exp.model_access import decoder_layers


class _RowLinear(torch.autograd.Function):
    """y = x W^T + b where W already holds ``rows_value`` at ``rows``; grads for the rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, rows_value, bias_rows_value):
        ctx.save_for_backward(x, rows, rows_value)
        # The weight is kept by reference, not saved: every forward writes the current rows
        # into it (sync_rows) and backward writes them again, which bumps its version, so a
        # module called twice in one step (the shared prefix, then the rest) would fail
        # autograd's version check though the rows it holds are the same. Backward's rewrite
        # is what guarantees them.
        ctx.weight = weight
        ctx.bias_rows_dtype = None if bias_rows_value is None else bias_rows_value.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, rows, rows_value = ctx.saved_tensors
        weight = ctx.weight
        # FSDP2 frees the gathered weight after forward and gathers it again from the shards
        # for backward, which hold the stored rows, not the current ones: write them again
        # (a no-op rewrite without sharding).
        with torch.no_grad():
            weight.index_copy_(0, rows, rows_value.detach().to(weight.dtype))
        dtype = grad_out.dtype  # bf16 under autocast, as a plain Linear's backward would be
        grad_x = (grad_out @ weight.to(dtype)).to(x.dtype)
        g_rows = grad_out.index_select(-1, rows).reshape(-1, rows.numel())
        grad_rows = (g_rows.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).to(rows_value.dtype)
        grad_bias_rows = (None if ctx.bias_rows_dtype is None
                          else g_rows.sum(0).to(ctx.bias_rows_dtype))
        return grad_x, None, None, None, grad_rows, grad_bias_rows


class _FrozenLinearFn(torch.autograd.Function):
    """y = x W^T + b for a frozen W, keeping W itself (not an autocast copy) for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = (grad_out @ weight.to(grad_out.dtype)).to(ctx.x_dtype)
        return grad_x, None, None


class FrozenLinear(nn.Linear):
    """An ``nn.Linear`` whose weight never trains (same parameters and state-dict keys).

    Under bf16 autocast a plain Linear keeps the bf16 copy of its weight alive for the
    backward pass (autocast caches casts only of weights that require grad); with every
    weight but a few rows frozen that is a second, half-size copy of the model. This one
    keeps the stored weight and casts again in backward. The class is swapped in place by
    ``apply_loki`` and back by ``merge_loki``. Never compiled (``implant/compiled.py``: a
    compiled graph would save the weight for backward).
    """

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return _FrozenLinearFn.apply(x, self.weight, self.bias)


class LoKILinear(nn.Module):
    """A frozen ``nn.Linear`` whose output rows ``rows`` are trainable."""

    def __init__(self, base_layer: nn.Linear, rows: list[int], lora_rank: int = 0,
                 lora_alpha: float | None = None):
        super().__init__()
        if not rows:
            raise LokiError("LoKILinear needs at least one trainable row")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        weight = base_layer.weight
        self.register_buffer("rows", torch.tensor(sorted(rows), dtype=torch.long,
                                                  device=weight.device), persistent=False)
        # fp32 master rows (exact: every bf16/fp16 value is an fp32 value).
        init_rows = weight.detach().index_select(0, self.rows).float()
        self.lora_rank = lora_rank
        if lora_rank:
            # LoKI*: W_S = W_S0 + (alpha / r) A B; A starts at zero so W_S starts at W_S0.
            self.register_buffer("rows_init", init_rows, persistent=False)
            self.lora_A = nn.Parameter(torch.zeros(len(rows), lora_rank, dtype=torch.float32,
                                                   device=weight.device))
            self.lora_B = nn.Parameter(torch.empty(lora_rank, weight.shape[1], dtype=torch.float32,
                                                   device=weight.device))
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            self.scaling = (lora_alpha or lora_rank) / lora_rank
        else:
            self.weight_rows = nn.Parameter(init_rows)
        bias = base_layer.bias
        self.bias_rows = (nn.Parameter(bias.detach().index_select(0, self.rows).float())
                          if bias is not None else None)

    def rows_value(self) -> torch.Tensor:
        """The current rows in fp32 (for LoKI* computed outside autocast, so A B stays fp32)."""
        if self.lora_rank:
            with torch.autocast(self.lora_A.device.type, enabled=False):
                return self.rows_init + self.scaling * (self.lora_A @ self.lora_B)
        return self.weight_rows

    @torch.no_grad()
    def sync_rows(self, rows_value: torch.Tensor | None = None) -> None:
        """Write the current trainable rows into the base weight (and bias)."""
        value = self.rows_value() if rows_value is None else rows_value
        self.base_layer.weight.index_copy_(0, self.rows, value.detach().to(self.base_layer.weight.dtype))
        if self.bias_rows is not None:
            bias = self.base_layer.bias
            bias.index_copy_(0, self.rows, self.bias_rows.detach().to(bias.dtype))

    @torch.compiler.disable  # writes its rows in place: implant/compiled.py
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.rows_value()
        self.sync_rows(value)
        base = self.base_layer
        return _RowLinear.apply(x, base.weight, base.bias, self.rows, value, self.bias_rows)

    def extra_repr(self) -> str:
        lora = f", lora_rank={self.lora_rank}" if self.lora_rank else ""
        return f"trainable_rows={self.rows.numel()}/{self.base_layer.out_features}{lora}"


def apply_loki(model: nn.Module, positions: list[list[int]], lora_rank: int = 0,
               lora_alpha: float | None = None) -> nn.Module:
    """Freeze every parameter, then make the selected down_proj rows trainable (in place)."""
    layers = decoder_layers(model)
    if len(positions) != len(layers):
        raise LokiError(f"positions have {len(positions)} layer lists, the model has "
                        f"{len(layers)} layers")
    model.requires_grad_(False)
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FrozenLinear
    for block, rows in zip(layers, positions):
        if rows:
            block.mlp.down_proj = LoKILinear(block.mlp.down_proj, rows, lora_rank, lora_alpha)
    return model


def merge_loki(model: nn.Module) -> nn.Module:
    """Write the trained rows back and put plain ``nn.Linear`` down_projs back (in place)."""
    for block in decoder_layers(model):
        proj = block.mlp.down_proj
        if isinstance(proj, LoKILinear):
            proj.sync_rows()
            block.mlp.down_proj = proj.base_layer
    for module in model.modules():
        if type(module) is FrozenLinear:
            module.__class__ = nn.Linear
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
