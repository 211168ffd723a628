"""The reference KVA engine: one Captum attribution per layer, every position scaled
(the definitions are in ``kva/engine.py``'s docstring and docs/method.md)."""

from __future__ import annotations

import torch
from torch import nn

from loki_exp.kva.passes import capture_outputs, target_of
from loki_exp.kva.settings import Attribution, KVASettings
from loki_exp.model_access import down_projs


class CaptumKVA:
    """The reference: one Captum attribution per layer, all positions scaled.

    ``token``: ``LayerIntegratedGradients`` on ``down_proj`` with the all-token-id input as
    baseline (the original code's computation, ``multiply_by_inputs=True``). ``zero``:
    ``IntegratedGradients`` on the down_proj output injected by a forward hook, baseline 0.
    """

    def __init__(self, model: nn.Module, settings: KVASettings):
        self.model = model
        self.settings = settings
        self.projs = down_projs(model)

    def _prob(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids, use_cache=False, logits_to_keep=1).logits
        return torch.softmax(logits[:, -1].float(), dim=-1)

    def attribute(self, input_ids: torch.Tensor) -> Attribution:
        from captum.attr import IntegratedGradients, LayerIntegratedGradients

        s = self.settings
        with torch.no_grad(), capture_outputs(self.projs) as outputs:
            target, prob = target_of(self.model(input_ids, use_cache=False,
                                              logits_to_keep=1).logits[0, -1])
        scores = []
        for layer, proj in enumerate(self.projs):
            if s.baseline == "token":
                lig = LayerIntegratedGradients(self._prob, proj, multiply_by_inputs=True)
                attr = lig.attribute(input_ids, baselines=torch.full_like(input_ids, s.baseline_token_id),
                                     target=target, n_steps=s.steps, method=s.method)
            else:
                def injected(z: torch.Tensor, proj=proj) -> torch.Tensor:
                    handle = proj.register_forward_hook(lambda m, i, o: z)
                    try:
                        return self._prob(input_ids.expand(z.shape[0], -1))
                    finally:
                        handle.remove()

                attr = IntegratedGradients(injected, multiply_by_inputs=True).attribute(
                    outputs[layer].detach(), baselines=0.0, target=target, n_steps=s.steps,
                    method=s.method)
            scores.append(attr[0, -1].detach().float())
        return Attribution(torch.stack(scores), target, prob)

    def __call__(self, input_ids: torch.Tensor) -> Attribution:
        return self.attribute(input_ids)
