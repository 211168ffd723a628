"""Tiny random decoders of every model type the fast KVA engine accepts (tests only).

Sliding windows (7 tokens) shorter than the probe prompts, Gemma's soft-capping strong enough
to matter, and every parameter perturbed away from its initial value (norm weights start at
identity, which would hide a missing norm).
"""

from __future__ import annotations

import torch
import transformers as tf

_COMMON = dict(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
_SLIDING = dict(sliding_window=7)
MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
               "olmo2", "phi3", "granite"]


def tiny_config(model_type: str):
    c = _COMMON
    return {
        "llama": lambda: tf.LlamaConfig(**c),
        "mistral": lambda: tf.MistralConfig(**c, **_SLIDING),
        "qwen2": lambda: tf.Qwen2Config(**c, **_SLIDING, use_sliding_window=True,
                                        max_window_layers=2),
        "qwen3": lambda: tf.Qwen3Config(**c, **_SLIDING, head_dim=8, use_sliding_window=True,
                                        max_window_layers=2),
        "gemma": lambda: tf.GemmaConfig(**c, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**c, **_SLIDING, head_dim=8,
                                          final_logit_softcapping=0.3, attn_logit_softcapping=2.0),
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **c, **_SLIDING, head_dim=8, final_logit_softcapping=0.3,
            layer_types=["sliding_attention", "full_attention"] * 2),
        "olmo": lambda: tf.OlmoConfig(**c),
        "olmo2": lambda: tf.Olmo2Config(**c),
        "phi3": lambda: tf.Phi3Config(**c),
        "granite": lambda: tf.GraniteConfig(**c, residual_multiplier=0.5),
    }[model_type]()


def tiny_decoder(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
