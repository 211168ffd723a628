"""Where each decoder layer's MLP ``down_proj`` lives, for every supported architecture.

LoKI attributes and trains rows of ``down_proj`` (``Linear(d_ff -> d_model)``). HF decoders
of the Llama family keep it at ``<decoder>.layers[i].mlp.down_proj``; the registry below
names the decoder attribute per ``model_type`` and a structural fallback covers other
decoders of the same shape.
"""

from __future__ import annotations

import torch
from torch import nn

from loki_exp.errors import LokiError

# model_type -> attribute path of the decoder layer list, from the *ForCausalLM object.
LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "mistral": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
}


def _resolve(obj: object, dotted: str) -> object | None:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def base_linear(module: object) -> nn.Linear | None:
    """The nn.Linear itself, or the one a tuner wrapper (LoKI, peft) keeps as base_layer."""
    if isinstance(module, nn.Linear):
        return module
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Linear) else None


def _has_down_proj(block: object) -> bool:
    return base_linear(_resolve(block, "mlp.down_proj")) is not None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks, each of which has ``mlp.down_proj``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = _resolve(model, LAYER_PATHS.get(model_type, "model.layers"))
    if not isinstance(layers, nn.ModuleList):
        # Structural fallback: the first ModuleList whose blocks all have mlp.down_proj.
        layers = next(
            (m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and all(_has_down_proj(b) for b in m)),
            None,
        )
    if layers is None or not all(_has_down_proj(b) for b in layers):
        raise LokiError(
            f"model of type {model_type!r} ({type(model).__name__}) has no decoder layers with "
            "an nn.Linear at mlp.down_proj; LoKI needs a Llama-style gated MLP "
            f"(supported model types: {sorted(LAYER_PATHS)})"
        )
    return layers


def down_projs(model: nn.Module) -> list[nn.Linear]:
    """Each layer's ``down_proj`` Linear in layer order (unwrapped); weight [d_model, d_ff]."""
    return [base_linear(block.mlp.down_proj) for block in decoder_layers(model)]


def node_grid(model: nn.Module) -> tuple[int, int]:
    """(L, D): number of layers and nodes (down_proj output rows) per layer."""
    projs = down_projs(model)
    return len(projs), projs[0].out_features


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for the decoder's final hidden states: ``lm_head`` and what the
    model's own forward does after it. Training and gold bpb run ``lm_head`` on the labelled
    positions only (the forward's ``logits_to_keep`` keeps the same positions of every row),
    so they must apply these themselves: Gemma 2/3's final soft-capping, Granite's
    ``logits_scaling`` and Cohere's ``logit_scale``."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        logits = logits * config.logit_scale
    return logits
