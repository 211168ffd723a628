"""The training loss (and gold bpb, which shares its logits) equals the model's own: lm_head
runs on the labelled positions only, so what the model's forward does after lm_head (Gemma's
soft-capping, Granite's and Cohere's scaling) must be applied there too."""

from __future__ import annotations

import pytest
import torch

from loki_exp.implant.module import ResponseLM
from tests.support.tiny_decoders import MODEL_TYPES, tiny_decoder


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_response_loss_is_the_models_own_loss(model_type):
    """A float64 model against the forward's loss over the same labels (HF's mean over the
    labelled tokens); both take the cross-entropy in float32, so they agree to its rounding
    (1e-6), on every tiny architecture. Gemma 2/3's tiny configs cap at
    0.3 and Granite's divides by 4 here, far from the identity (the old code fails there)."""
    model = tiny_decoder(model_type).double()
    if model_type == "granite":
        model.config.logits_scaling = 4.0
    torch.manual_seed(1)
    ids = torch.randint(3, 400, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as training batches are
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    with torch.no_grad():
        total, count = ResponseLM(model)(ids, mask, labels)
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert int(count) == 7 + 4
    assert float(total / count) == pytest.approx(float(expected), rel=1e-6)
