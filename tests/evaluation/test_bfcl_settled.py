"""BFCL generation ends a row once its score is settled: ``never_parses`` must never call a
text settled whose finished form would parse (sound), and should settle prose early."""

from __future__ import annotations

import pytest

from loki_exp.data.bfcl import heldout_by_category
from loki_exp.evaluation.bfcl_match import never_parses, parse_calls
from loki_exp.evaluation.task_metric import bfcl_correct, bfcl_settled

# Texts that parse as calls, chosen to look like prose inside strings, to span lines, to hold
# keywords, raw, bytes and implicitly joined strings, comments, non-ASCII names and fences.
PARSING = [
    "[f(x='New York is big')]",
    '[f(x="Here is a def", y=\'class\')]',
    "[a.b.c(d=[1, 2], e={'k': 'v w'})]",
    "[f(x=r'a b', y=b'c d', z=u'e f')]",
    "[f(x='it' 's')]",
    "[f(x='''one\ntwo three''')]",
    "[f(\n    x=1,\n    y='a b',\n)]",
    "[f(x=1)]  # a comment with words",
    "f(x=True, y=None, z=-1.5e3)",
    "f(x=1), g(y='import this')",
    "[caf\u00e9(na\u00efve='x y')]",
    "```python\n[f(x='a b')]\n```",
    "```\nf(x=1)\n```",
    "  \n[f(x=1)]\n",
    "[f(x=None, y=False), g(iffy='ok')]",
]
PROSE = [
    ("Here is a Python function", "Here is a Python "),  # "Here is a" is a comparison
    ("Here's how", "Here'"),
    ("The area of a triangle", "The area "),
    ("def f(x):\n    return x", "def "),
    ("```python\ndef get(city):", "```python\ndef "),
    ("[f(x=1)] is the answer here", "[f(x=1)] is the answer "),
    ("To find $300 there", "To find "),
]


def test_a_character_split_across_tokens_is_not_read():
    """Decoded mid-character, U+FFFD may finish as a letter that extends the name before it."""
    assert parse_calls("pass\u00e9(x=1)") == [("pass\u00e9", {"x": 1})]
    assert never_parses("pass ") and not never_parses("pass\ufffd")
    assert not never_parses("The area\ufffd ") and never_parses("The area \ufffd")


@pytest.mark.parametrize("text", PARSING)
def test_no_prefix_of_a_parsing_text_is_settled(text):
    assert parse_calls(text) is not None
    assert not any(never_parses(text[:k]) for k in range(len(text) + 1))


def test_no_prefix_of_bfcl_answers_is_settled():
    """Every held-out answer of three call categories, character by character."""
    held = heldout_by_category(["simple_python", "multiple", "live_simple"], 0.2, 30)
    targets = [item.target for items in held.values() for item in items]
    assert len(targets) == 90 and all(parse_calls(t) is not None for t in targets)
    for text in targets:
        assert not any(never_parses(text[:k]) for k in range(len(text) + 1)), text


@pytest.mark.parametrize(("text", "settled_at"), PROSE)
def test_prose_is_settled_at_its_second_word(text, settled_at):
    assert parse_calls(text) is None
    first = next(k for k in range(len(text) + 1) if never_parses(text[:k]))
    assert text[:first] == settled_at
    assert never_parses(text)


def test_an_irrelevance_item_settles_only_once_it_calls_for_sure():
    held = heldout_by_category(["irrelevance", "simple_python"], 0.2, 1)
    irrelevant, simple = held["irrelevance"][0], held["simple_python"][0]
    prose = "None of the functions can help here."
    assert bfcl_settled(simple)(prose) and not bfcl_correct(prose, simple)
    # Prose is right for an irrelevance item unless a tag comes later: never settled early.
    assert not bfcl_settled(irrelevant)(prose) and bfcl_correct(prose, irrelevant)
    tagged = "I will call <tool_call> now"
    assert bfcl_settled(irrelevant)(tagged)
    assert not bfcl_correct(tagged, irrelevant) and not bfcl_correct(tagged + " more", irrelevant)


@pytest.mark.slow
def test_smollm2_scores_the_same_with_rows_settled_early(compose_cfg):
    """The real base model answers BFCL prompts with prose: settled at its second word, each
    item scores as its whole 64-token generation does."""
    from loki_exp.evaluation.task_metric import bfcl_accuracy, generate
    from loki_exp.models import load_model

    loaded = load_model(compose_cfg("model=smollm2").model)
    held = heldout_by_category(["simple_python", "live_simple", "irrelevance"], 0.2, 4)
    items = [item for category in held.values() for item in category]
    whole = generate(loaded.model, loaded.tokenizer, [i.messages for i in items], 64, 8192)
    _, rows = bfcl_accuracy(loaded.model, loaded.tokenizer, items, 64, 8192)
    assert [r["correct"] for r in rows] == [bfcl_correct(t, i) for t, i in zip(whole, items)]
    assert all(w.startswith(r["generated"]) for w, r in zip(whole, rows))
    settled_early = [r["generated"] != w for w, r in zip(whole, rows)]
    assert sum(settled_early[:8]) >= 6 and not any(settled_early[8:])  # irrelevance: never
