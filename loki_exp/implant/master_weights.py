"""fp32 master copies of trainable parameters stored in a lower precision (bf16/fp16).

LlamaFactory trains a bf16 model under AMP or DeepSpeed ZeRO-2, which keep an fp32 master of
every trainable weight: the forward reads the bf16 copy, the optimizer updates the fp32 one,
and the bf16 copy is refreshed from it after each step. Without masters an AdamW step at lr
1e-5 leaves most entries of a bf16 weight unchanged (the update is below bf16's resolution).
Lightning offers no such plugin for a model kept in bf16 ("bf16-true" updates the bf16
weights directly), hence this small helper; LoKI's rows and LoKI*'s factors, and peft's
adapters, are fp32 parameters already and need none.

Gradients move to the masters just before the optimizer step (after DDP's all-reduce and
gradient accumulation), so the masters see exactly the gradient the bf16 parameters got.
Under FSDP2 the sharded parameters themselves are made fp32 instead (``CausalLMTuner.
configure_model``), and this helper finds nothing to do.
"""

from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    """fp32 masters for the low-precision parameters among ``named_params``."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]],
                 saved: dict[str, torch.Tensor] | None = None):
        self.pairs: list[tuple[str, nn.Parameter, nn.Parameter]] = []
        for name, param in named_params:
            if param.dtype in (torch.bfloat16, torch.float16):
                start = saved[name] if saved and name in saved else param.detach()
                master = nn.Parameter(start.to(device=param.device, dtype=torch.float32,
                                               copy=True))
                self.pairs.append((name, param, master))
        self._master_of = {id(p): m for _, p, m in self.pairs}

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def optimizer_params(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """What the optimizer updates: each low-precision parameter replaced by its master."""
        return [self._master_of.get(id(p), p) for p in params]

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        for _, param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for _, param, master in self.pairs:
            param.copy_(master)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: master.detach() for name, _, master in self.pairs}
