"""Task data: BFCL targets and split, the JSONL format, encoding with response-only labels."""

from __future__ import annotations

import json

import pytest

from loki_exp.data import bfcl
from loki_exp.data.sft import IGNORE, Example, PadCollator, encode, encode_all
from loki_exp.data.tasks import load_task
from loki_exp.errors import LokiError


def test_canonical_target_takes_first_non_empty_value_and_omits_optional():
    truth = [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]
    assert bfcl.canonical_calls(truth) == "[calculate_triangle_area(base=10, height=5, unit='units')]"
    truth = [{"f": {"a": ["", "x"], "b": [""]}}, {"g": {"n": [[1, 2]], "flag": [True, False]}}]
    assert bfcl.canonical_calls(truth) == "[f(a='x'), g(n=[1, 2], flag=True)]"


@pytest.fixture(scope="module")
def bfcl_split():
    return bfcl.load_split(["simple_python", "multiple", "live_simple"], 0.2)


def test_bfcl_split_is_deterministic_and_disjoint(bfcl_split):
    train_ids = {i.id for i in bfcl_split.train}
    test_ids = {i.id for i in bfcl_split.test}
    assert len(train_ids) + len(test_ids) == 400 + 200 + 258
    assert not train_ids & test_ids
    assert 0.15 < len(test_ids) / (len(train_ids) + len(test_ids)) < 0.25
    again = bfcl.load_split(["simple_python", "multiple", "live_simple"], 0.2)
    assert [i.id for i in again.test] == [i.id for i in bfcl_split.test]
    # Adding a category never moves an id across the split.
    more = bfcl.load_split(["simple_python", "multiple", "live_simple", "parallel"], 0.2)
    assert test_ids <= {i.id for i in more.test}


def test_bfcl_prompt_has_the_function_schemas(bfcl_split):
    item = next(i for i in bfcl_split.train + bfcl_split.test if i.id == "simple_python_0")
    assert item.messages[0]["role"] == "system" and "calculate_triangle_area" in item.messages[0]["content"]
    assert item.messages[1] == {"role": "user", "content": "Find the area of a triangle with a "
                                "base of 10 units and height of 5 units."}
    assert item.target == "[calculate_triangle_area(base=10, height=5, unit='units')]"


def test_bfcl_row_missing_fields_is_a_counted_skip():
    good = {"id": "x_1", "question": [[{"role": "user", "content": "hi"}]],
            "function": [{"name": "f", "parameters": {}}]}
    answer = {"id": "x_1", "ground_truth": [{"f": {}}]}
    assert bfcl.parse_row(good, answer, "simple_python").target == "[f()]"
    for broken in ({k: v for k, v in good.items() if k != "function"},
                   {**good, "question": []}):
        assert bfcl.parse_row(broken, answer, "simple_python") is None
    assert bfcl.parse_row(good, None, "simple_python") is None
    assert bfcl.parse_row(good, {"id": "x_1"}, "simple_python") is None
    with pytest.raises(LokiError, match="dataset.categories has \\['multi_turn_base'\\]"):
        bfcl.load_items(["multi_turn_base"])


def test_encoding_masks_the_prompt_and_drops_long_examples_by_default(tiny_models):
    tok = tiny_models["tiny_llama"].tokenizer
    ex = Example("a", [{"role": "user", "content": "Add 2 and 3."}], "[add(a=2, b=3)]")
    enc = encode(tok, ex, 768)
    n_prompt = sum(1 for x in enc["labels"] if x == IGNORE)
    response = tok.decode(enc["input_ids"][n_prompt:])
    assert response == "[add(a=2, b=3)]<|im_end|>"
    assert tok.decode(enc["input_ids"][:n_prompt]).endswith("<|im_start|>assistant\n")
    assert encode(tok, ex, len(enc["input_ids"]) - 1) is None
    kept, counts = encode_all(tok, [ex, ex], len(enc["input_ids"]) - 1)
    assert kept == [] and counts.total_dropped == 2
    batch = PadCollator(tok.eos_token_id)([enc, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].shape == (2, len(enc["input_ids"]))
    assert batch["attention_mask"][1].tolist() == [1] + [0] * (len(enc["input_ids"]) - 1)
    assert (batch["labels"][1, 1:] == IGNORE).all()


def test_every_assistant_turn_is_labelled_and_nothing_else(tiny_models):
    """A hand-written conversation with three assistant turns: exactly the assistant spans
    (content and end-of-turn token) carry labels; system, user and tool turns do not."""
    tok = tiny_models["tiny_llama"].tokenizer
    turns = [{"role": "system", "content": "You call tools."},
             {"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "[weather(city='Paris')]"},
             {"role": "tool", "content": "{\"temp\": 21}"},
             {"role": "assistant", "content": "It is 21 degrees."},
             {"role": "user", "content": "And Rome?"}]
    ex = Example("mt", turns, "[weather(city='Rome')]")
    enc = encode(tok, ex, 4096)
    ids, labels = enc["input_ids"], enc["labels"]
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append(tok.decode(ids[start:i]))
            start = None
    assert spans == ["[weather(city='Paris')]<|im_end|>", "It is 21 degrees.<|im_end|>",
                     "[weather(city='Rome')]<|im_end|>"]
    assert all(label in (IGNORE, token) for label, token in zip(labels, ids))
    # The tokens are the conversation as the template renders it.
    rendered = tok.apply_chat_template([*turns, {"role": "assistant", "content": ex.response}],
                                       tokenize=False)
    assert rendered.startswith(tok.decode(ids)) and rendered[len(tok.decode(ids)):] == "\n"


def test_truncation_keeps_the_head_and_drops_examples_with_nothing_left(tiny_models):
    tok = tiny_models["tiny_llama"].tokenizer
    ex = Example("a", [{"role": "user", "content": "Add 2 and 3."}], "[add(a=2, b=3)] " * 20)
    full = encode(tok, ex, 4096)
    n_prompt = full["labels"].index(next(x for x in full["labels"] if x != IGNORE))
    cut = encode(tok, ex, n_prompt + 5, overflow="truncate")
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 5]
    assert cut["labels"] == full["labels"][:n_prompt + 5]
    assert encode(tok, ex, n_prompt, overflow="truncate") is None
    with pytest.raises(LokiError, match="dataset.overflow='wrap' is not known"):
        encode(tok, ex, 10, overflow="wrap")


def test_jsonl_dataset(compose_cfg, tmp_path):
    path = tmp_path / "task.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    rows.append({"id": "chat", "messages": [{"role": "user", "content": "u"},
                                            {"role": "assistant", "content": "r"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_task(compose_cfg("dataset=jsonl", f"dataset.path={path}").dataset)
    assert len(task.train) + len(task.test) == 21
    chat = next(e for e in task.train + task.test if e.id == "chat")
    assert chat.messages == [{"role": "user", "content": "u"}] and chat.response == "r"


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "q"}\n', r"task.jsonl:1: expected keys 'prompt' and 'response'"),
    ('{"prompt": "q", "response": "a"}\nnot json\n', r"task.jsonl:2: not valid JSON"),
    ('[1, 2]\n', r"task.jsonl:1: expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "u"}]}\n', "must be a list of"),
    ('\n\n', "holds no examples"),
])
def test_bad_jsonl(compose_cfg, tmp_path, content, match):
    path = tmp_path / "task.jsonl"
    path.write_text(content)
    with pytest.raises(LokiError, match=match):
        load_task(compose_cfg("dataset=jsonl", f"dataset.path={path}").dataset)


def test_missing_jsonl_and_unreachable_hub(compose_cfg, tmp_path):
    with pytest.raises(LokiError, match="dataset.path=.*does not exist"):
        load_task(compose_cfg("dataset=jsonl", f"dataset.path={tmp_path}/no.jsonl").dataset)
    with pytest.raises(LokiError, match="could not load 'Team-ACE/ToolACE'.*dataset=jsonl"):
        load_task(compose_cfg("dataset=toolace").dataset)


def test_a_bfcl_category_is_parsed_once_per_process(monkeypatch):
    """Training, gold bits per byte and the generated calls each read a category; the pinned
    file is parsed the first time only, and every reader gets the same items."""
    from loki_exp.data import bfcl

    first, skipped = bfcl.load_items(["simple_python"])
    monkeypatch.setattr(bfcl, "_read_jsonl", lambda *a: (_ for _ in ()).throw(
        AssertionError("read again")))
    again, skipped_again = bfcl.load_items(["simple_python"])
    assert again == first and skipped_again == skipped and len(first) == 400
    again.pop()  # a reader's list is its own
    assert len(bfcl.load_items(["simple_python"])[0]) == 400
