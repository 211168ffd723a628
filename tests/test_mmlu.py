import pytest

from loki_exp.data.mmlu import (
    load_offline,
    load_probe,
    render_prompt,
    sample_per_subject,
    user_message,
)
from loki_exp.errors import LokiError


@pytest.fixture(scope="module")
def mmlu():
    return load_offline()


def _first(items, subject):
    return next(i for i in items if i.subject == subject)


def test_offline_mmlu_has_57_subjects(mmlu):
    assert len(mmlu) == 14044
    assert len({i.subject for i in mmlu}) == 57
    assert {"us_foreign_policy", "high_school_physics", "abstract_algebra"} <= {i.subject for i in mmlu}


# Written out by hand from the original analyse_mmlu.py's build_conversation.
EXPECTED_US_FP = (
    "There is a single choice question about Us Foreign Policy. Answer the question by "
    "replying A, B, C or D.\n"
    "Question: What is the structure of the United Nations Security Council?\n"
    "Choices:\n"
    "A. 5 permanent members with veto power, 10 rotating members with no veto power\n"
    "B. 5 permanent members and 10 rotating members, all with veto power\n"
    "C. 10 permanent members with veto power, and 5 rotating members without veto power\n"
    "D. 15 permanent members with veto power\n"
    "Answer: \n"
)
EXPECTED_HS_PHYSICS = (
    "There is a single choice question about High School Physics. Answer the question by "
    "replying A, B, C or D.\n"
    "Question: The plates of a capacitor are charged to a potential difference of 5 V. If the "
    "capacitance is 2 mF, what is the charge on the positive plate?\n"
    "Choices:\nA. 0.005 C\nB. 0.01 C\nC. 0.02 C\nD. 0.5 C\nAnswer: \n"
)


def test_prompts_match_the_original_byte_for_byte(mmlu):
    assert user_message(_first(mmlu, "us_foreign_policy")).encode() == EXPECTED_US_FP.encode()
    assert user_message(_first(mmlu, "high_school_physics")).encode() == EXPECTED_HS_PHYSICS.encode()


def test_rendered_through_the_chat_template_with_generation_prompt(mmlu, tiny_models):
    text = render_prompt(tiny_models["tiny_llama"].tokenizer, _first(mmlu, "us_foreign_policy"))
    assert text.endswith("<|im_start|>user\n" + EXPECTED_US_FP + "<|im_end|>\n<|im_start|>assistant\n")


def test_sampling_per_subject_is_seeded_and_spans_subjects(mmlu):
    a = sample_per_subject(mmlu, 50, seed=42)
    assert len(a) == 57 * 50 and len({i.sample_id for i in a}) == len(a)
    assert a == sample_per_subject(mmlu, 50, seed=42)
    assert a != sample_per_subject(mmlu, 50, seed=1)
    # Interleaved: the first 57 prompts are one per subject.
    assert len({i.subject for i in a[:57]}) == 57
    assert len(sample_per_subject(mmlu, None, seed=0)) == len(mmlu)


def test_probe_limit_and_bad_values(mmlu):
    assert len(load_probe("offline", 50, 42, limit=8)) == 8
    with pytest.raises(LokiError, match="samples_per_subject=0"):
        sample_per_subject(mmlu, 0, seed=0)
    with pytest.raises(LokiError, match="kva.limit=0"):
        load_probe("offline", 50, 42, limit=0)
    with pytest.raises(LokiError, match="kva.probe.source='web'"):
        load_probe("web", 50, 42)
