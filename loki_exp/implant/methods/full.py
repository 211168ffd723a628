"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from loki_exp.implant.methods.base import Method, MethodSettings, unchanged


def _prepare(cfg, model, positions, context):
    model.requires_grad_(True)
    return model


FULL = Method("full", MethodSettings, _prepare, unchanged, "every parameter")
