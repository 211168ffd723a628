"""The training loss (and gold bpb, which shares its logits) equals the model's own: lm_head
runs on the labelled positions only, so what the model's forward does after lm_head (Gemma's
soft-capping, Granite's and Cohere's scaling) must be applied there too."""

from __future__ import annotations

import pytest
import torch

from loki_exp.data.sft import shared_prefix
from loki_exp.implant.module import ResponseLM
from tests.support.tiny_decoders import MODEL_TYPES, tiny_decoder
from tests.support.tolerances import CROSS_PATH_FP32, FLOAT32_STEPS


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_response_loss_is_the_models_own_loss(model_type):
    """A float64 model against the forward's loss over the same labels (HF's mean over the
    labelled tokens); both take the cross-entropy in float32, so they agree to its rounding
    (``FLOAT32_STEPS``), on every tiny architecture. Gemma 2/3's tiny configs cap at
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
    assert float(total / count) == pytest.approx(float(expected), rel=FLOAT32_STEPS)


def both_ways(model, ids, mask, labels) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """(loss, gradient of every trained parameter) with the shared prefix run once, then in
    one pass."""
    results = []
    for share in (True, False):
        lm = ResponseLM(model)
        lm.share_prefix = share
        model.zero_grad()
        total, _ = lm(ids, mask, labels)
        total.backward()
        results.append((float(total.detach()), {n: p.grad.clone() for n, p in
                                                model.named_parameters() if p.grad is not None}))
    return results


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_shared_prefix_runs_once_with_the_same_loss_and_gradients(model_type):
    """Rows sharing 10 leading tokens (longer than the tiny models' 7-token sliding windows),
    right-padded, labels after the prefix: the prefix is found and run once, and the loss and
    every parameter's gradient equal the one-pass forward's (float64, 1e-6: Gemma's norms
    compute in float32; Gemma 2 in float32 within ``CROSS_PATH_FP32``, where transformers'
    float64 eager attention gives a pad row that its window fully masks NaN)."""
    dtype, rel = ((torch.float32, CROSS_PATH_FP32) if model_type == "gemma2"
                  else (torch.float64, FLOAT32_STEPS))
    model = tiny_decoder(model_type).to(dtype).train()
    torch.manual_seed(2)
    ids = torch.randint(3, 400, (3, 20))
    ids[:, :10] = ids[0, :10]
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    labels = ids.clone()
    labels[:, :12] = -100
    labels[2, 15:] = -100
    assert shared_prefix(ids, mask, labels) == 10
    (shared_loss, shared_grads), (loss, grads) = both_ways(model, ids, mask, labels)
    assert shared_loss == pytest.approx(loss, rel=rel)
    assert shared_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        scale = float(grad.abs().max())
        assert float((shared_grads[name] - grad).abs().max()) <= rel * max(scale, 1e-12), name


def test_the_shared_prefix_stops_before_the_first_scored_position_and_at_pads():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 2]])
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, 4] = ids[:, 4]
    assert shared_prefix(ids, mask, labels) == 3
    labels[0, 2] = 7  # a label at position 2 is scored by position 1's logits
    assert shared_prefix(ids, mask, labels) == 1
    mask[1, 1:] = 0  # pads never count as shared
    assert shared_prefix(ids, mask, torch.full_like(ids, -100)) == 1


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_loki_rows_train_the_same_with_the_shared_prefix(lora_rank):
    """LoKI (and LoKI*) modules run twice in one step when the prefix is shared: their rows'
    gradients equal the one-pass step's (a float64 model; the rows are fp32 masters, whose
    gradient is the sum of two float32-rounded parts here: 1e-6 of the largest). Failed
    before the row Linear kept its weight by reference: each forward rewrites the rows into
    it, so autograd refused it."""
    from loki_exp.implant.loki_linear import apply_loki

    model = tiny_decoder("llama").double().train()
    apply_loki(model, [[0, 3], [1], [5, 7], [2]], lora_rank=lora_rank)
    torch.manual_seed(3)
    ids = torch.randint(3, 400, (2, 16))
    ids[1, :9] = ids[0, :9]
    labels = ids.clone()
    labels[:, :11] = -100
    mask = torch.ones_like(ids)
    grads = [g for _, g in both_ways(model, ids, mask, labels)]
    assert len(grads[0]) == 4 * (2 if lora_rank else 1)
    for name, grad in grads[1].items():
        assert float((grads[0][name] - grad).abs().max()) <= FLOAT32_STEPS * float(grad.abs().max()), name
