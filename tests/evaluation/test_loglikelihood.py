"""Continuation log-likelihoods with shared contexts computed once give what lm-eval's one
sequence per request gives: the same sums and greedy flags."""

from __future__ import annotations

import pytest
import torch

from loki_exp.evaluation.loglikelihood import common_prefix, continuation_logprobs, truncate
from tests.support.tiny_decoders import MODEL_TYPES, tiny_decoder
from tests.support.tolerances import CROSS_PATH_FP32, FLOAT32_STEPS


def one_sequence(model, context, continuation):
    """lm-eval's way: (context + continuation)[:-1] in one unpadded forward."""
    ids = torch.tensor([context + continuation][0][:-1])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -len(continuation):].double(), -1)
    target = torch.tensor(continuation)
    return (float(logp.gather(-1, target[:, None]).sum()),
            bool((logp.argmax(-1) == target).all()))


def requests_with_shared_parts(model):
    """A 12-token few-shot prefix (longer than the tiny models' 7-token windows) before every
    context; three contexts of different lengths with 1-4 choices each, one-token choices
    included; and one request whose continuation is the greedy one."""
    g = torch.Generator().manual_seed(3)

    def toks(n):
        return torch.randint(3, 500, (n,), generator=g).tolist()

    shots = toks(12)
    contexts = [shots + toks(n) for n in (3, 9, 5)]
    requests = [(contexts[0], toks(4)), (contexts[0], toks(1)), (contexts[0], toks(6)),
                (contexts[1], toks(2)), (contexts[2], toks(1)), (contexts[2], toks(3)),
                (contexts[2], toks(7)), (contexts[1], toks(5))]
    greedy = []
    for _ in range(3):  # the greedy continuation of context 1, three tokens long
        with torch.no_grad():
            greedy.append(int(model(torch.tensor([contexts[1] + greedy])).logits[0, -1].argmax()))
    return requests + [(contexts[1], greedy)]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_shared_contexts_give_each_requests_own_sequence_scores(model_type, batch_size):
    """Every tiny architecture (sliding windows shorter than the prefix): the greedy flags
    identical, in the requests' order, the sums equal to 1e-6 relative in float64 (Gemma's
    norms compute in float32 even there: 2e-9 apart). Gemma 2 runs in float32, within
    ``CROSS_PATH_FP32``: in float64 transformers' eager attention turns a left pad's fully
    masked row into NaN (float64's minimum added twice is -inf), which it does not in float32.
    An attended pad or a wrong position moves these sums by 1e-2 and more."""
    dtype, rel = ((torch.float32, CROSS_PATH_FP32) if model_type == "gemma2"
                  else (torch.float64, FLOAT32_STEPS))
    model = tiny_decoder(model_type).to(dtype)
    requests = requests_with_shared_parts(model)
    got = continuation_logprobs(model, requests, max_length=1024, batch_size=batch_size, pad_id=2)
    expected = [one_sequence(model, ctx, cont) for ctx, cont in requests]
    assert [g for _, g in got] == [g for _, g in expected]
    assert expected[-1][1] and not expected[0][1]
    for (value, _), (want, _) in zip(got, expected):
        assert value == pytest.approx(want, rel=rel)


def test_the_common_prefix_leaves_each_context_a_token_and_truncation_is_lm_evals():
    assert common_prefix([(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 9)]) == 2
    assert common_prefix([(1, 2, 3), (1, 2, 3, 4)]) == 2  # the shorter keeps its last token
    assert common_prefix([(1, 2, 3)]) == 0
    # (context + continuation)[-(max_length + 1):], continuation whole: lm-eval's cut
    assert truncate([1, 2, 3, 4, 5], [6, 7], max_length=4) == (3, 4, 5)
    with pytest.raises(ValueError, match="1..4 tokens"):
        truncate([1], [1, 2, 3, 4, 5], max_length=4)


@pytest.mark.slow
def test_smollm2_scores_as_lm_evals_own_loop(compose_cfg):
    """SmolLM2 (float32) on real requests, through the suite's own entry points: ARC-Challenge
    (4 choices sharing a context) scores every item the same, and GSM8K's 5-shot gold answers
    (738 shared tokens) have the same bits per byte within ``CROSS_PATH_FP32``, as lm-eval's
    one sequence per request gives them."""
    from lm_eval.models.huggingface import HFLM

    from loki_exp.evaluation.bpb import score_bpb
    from loki_exp.evaluation.suite import make_lm, run_suite
    from loki_exp.models import load_model

    loaded = load_model(compose_cfg("model=smollm2").model)
    shared = make_lm(loaded.model, loaded.tokenizer, 8)
    own = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=8, device="cpu")
    assert type(shared)._loglikelihood_tokens is not HFLM._loglikelihood_tokens
    got, want = (run_suite(lm, ["arc_challenge"], 24)[1] for lm in (shared, own))
    assert got == want
    got, want = (score_bpb(lm, loaded.tokenizer, ["gsm8k"], 6) for lm in (shared, own))
    for key in ("gsm8k", "gsm8k_chat"):
        assert torch.tensor(got[key]) == pytest.approx(torch.tensor(want[key]),
                                                       rel=CROSS_PATH_FP32)
