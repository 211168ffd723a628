"""The paper's S-H / S-L ablation: no training; the selected rows are zeroed."""

from __future__ import annotations

from dataclasses import dataclass

from loki_exp.config_fields import spec
from loki_exp.implant.methods.base import Method, MethodSettings, unchanged


@dataclass
class SuppressSettings(MethodSettings):
    lr: float = spec(0.0, ge=0.0)  # nothing is trained


def suppress_rows(model, positions):
    """Zero the selected down_proj rows (and their bias entries); nothing trains."""
    import torch

    from loki_exp.model_access import down_projs

    model.requires_grad_(False)
    with torch.no_grad():
        for proj, rows in zip(down_projs(model), positions):
            if rows:
                index = torch.tensor(rows, device=proj.weight.device)
                proj.weight.index_fill_(0, index, 0.0)
                if proj.bias is not None:
                    proj.bias.index_fill_(0, index, 0.0)
    return model


SUPPRESS = Method("suppress", SuppressSettings, lambda cfg, model, positions, context:
                  suppress_rows(model, positions), unchanged, "the selected rows zeroed, no training",
                  selects_rows=True, trains=False, starts_at_base=False)
