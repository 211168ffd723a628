"""The task side of a run: gold-answer bits per byte, the four BFCL measures, training data
that teaches when not to call, no silent loss of data, and the random-rows control."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from loki_exp.data import bfcl
from loki_exp.data.sft import IGNORE, Example, PadCollator, encode, encode_all, shared_prefix
from loki_exp.data.tasks import load_task
from loki_exp.evaluation.gold_bpb import gold_bpb
from loki_exp.evaluation.task_metric import gold_after_prompt
from loki_exp.selection import node_budget, select_random
from tests.support.tiny_decoders import MODEL_TYPES, tiny_decoder
from tests.support.tolerances import CROSS_PATH_FP32, FLOAT32_STEPS

TRAINED = ["simple_python", "multiple", "live_simple"]


def _nll_bpb(model, tok, item) -> float:
    """One full forward of the item alone (every position's logits, no batching)."""
    enc = encode(tok, item, 1 << 30)
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.tensor(enc["labels"][1:])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    keep = labels != IGNORE
    nll = -logp[keep].gather(1, labels[keep][:, None]).sum()
    answer = [m["content"] for m in item.messages if m["role"] == "assistant"]
    n_bytes = sum(len(t.encode()) for t in [*answer, item.response])
    return float(nll) / (math.log(2) * n_bytes)


def test_gold_bpb_is_the_labelled_tokens_nll_over_the_answer_bytes(tiny_models):
    """Against one full forward per item: in float64, where batching and padding change
    nothing beyond rounding far below 1e-9."""
    loaded = tiny_models["tiny_llama"]
    model, tok = loaded.model.double(), loaded.tokenizer
    try:
        items = [Example("a", [{"role": "user", "content": "Add 2 and 3."}], "[add(a=2, b=3)]"),
                 Example("b", [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Weather in Rome?"},
                               {"role": "assistant", "content": "[weather(city='Rome')]"},
                               {"role": "user", "content": "And Paris, then Oslo?"}],
                         "[weather(city='Paris'), weather(city='Oslo')]"),
                 Example("c", [{"role": "user", "content": "Say hi é."}], "hi é")]
        got = gold_bpb(model, tok, items, batch_size=2)
        for item, value in zip(items, got):
            assert value == pytest.approx(_nll_bpb(model, tok, item), rel=1e-9)
        # Both assistant turns of the conversation are scored, each with its end of turn.
        assert int((torch.tensor(encode(tok, items[1], 1 << 30)["labels"]) != IGNORE).sum()) > \
            len(tok("[weather(city='Paris'), weather(city='Oslo')]").input_ids)
    finally:
        model.float()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gold_bpb_runs_the_shared_system_prompt_once_with_the_same_scores(tiny_models, model_type):
    """Items sharing a system prompt longer than the tiny models' 7-token sliding windows: the
    prefix is found (up to the first scored position) and run once, and every item's score
    equals its own full forward (float64, 1e-6: Gemma's norms compute in float32), on every
    tiny architecture. Gemma 2 runs in float32, within ``CROSS_PATH_FP32``: in float64
    transformers' eager attention turns a pad row that its sliding window fully masks into NaN
    (test_loglikelihood.py)."""
    tok = tiny_models["tiny_llama"].tokenizer
    dtype, rel = ((torch.float32, CROSS_PATH_FP32) if model_type == "gemma2"
                  else (torch.float64, FLOAT32_STEPS))
    model = tiny_decoder(model_type).to(dtype)
    system = {"role": "system", "content": "You call functions. Reply with the call list only."}
    items = [Example(str(i), [system, *turns], answer) for i, (turns, answer) in enumerate([
        ([{"role": "user", "content": "Add 2 and 3."}], "[add(a=2, b=3)]"),
        ([{"role": "user", "content": "Weather in Rome?"},
          {"role": "assistant", "content": "[weather(city='Rome')]"},
          {"role": "user", "content": "And Oslo?"}], "[weather(city='Oslo')]"),
        ([{"role": "user", "content": "Say hi."}], "hi"),
        ([{"role": "user", "content": "Multiply 4 by 5, then add 1 to it."}], "[mul(a=4, b=5)]")])]
    shared = shared_prefix(**PadCollator(2)([encode(tok, item, 1 << 30) for item in items]))
    assert shared > 12  # "<|im_start|>system\nYou call functions. ..." in every item
    got = gold_bpb(model, tok, items, batch_size=3)
    for item, value in zip(items, got):
        assert value == pytest.approx(_nll_bpb(model, tok, item), rel=rel)


def test_bfcl_measures_are_category_means_and_the_leaderboard_needs_all_ten(monkeypatch):
    """The four measures from one generation: trained and transfer accuracy, the false-call
    rate (1 - irrelevance accuracy) and the leaderboard's 10-category mean."""
    from loki_exp.evaluation import task_metric

    generations = []

    def fake_accuracy(model, tokenizer, items, max_new_tokens, batch_size, gold=None):
        # Right on every simple_python item and every irrelevance item, wrong elsewhere.
        generations.append({i.category for i in items})
        return 0.0, [{"id": i.id, "correct": i.category in ("simple_python", "irrelevance"),
                      **({"gold_nll": 1.5} if gold and i.id in gold else {})} for i in items]

    monkeypatch.setattr(task_metric, "bfcl_accuracy", fake_accuracy)
    scores, items, gold_nll = task_metric.bfcl_measures(
        None, None, TRAINED, 0.2, {"trained": 4, "irrelevance": 3, "transfer": 2}, 8, 4)
    assert gold_nll == {}
    assert scores["trained_accuracy"] == pytest.approx(1 / 3)
    assert scores["trained_accuracy/simple_python"] == 1.0
    assert len(items["trained_accuracy/multiple"]) == 4
    assert scores["false_call_rate/irrelevance"] == 0.0
    assert scores["false_call_rate/live_irrelevance"] == 1.0 and scores["false_call_rate"] == 0.5
    assert scores["transfer_accuracy"] == 0.0
    assert set(k.split("/")[1] for k in items if k.startswith("transfer_")) == {
        "parallel", "parallel_multiple", "live_multiple", "live_parallel", "live_parallel_multiple"}
    assert scores["leaderboard_accuracy"] == pytest.approx(2 / 10)
    assert len(generations) == 1 and len(generations[0]) == 10  # one generation, all categories
    # Without the transfer categories the leaderboard is not complete: no such score.
    held = task_metric.bfcl_heldout(TRAINED, 0.2, {"trained": 2})["trained"]["multiple"]
    scores, items, gold_nll = task_metric.bfcl_measures(
        None, None, TRAINED, 0.2, {"trained": 2, "irrelevance": 1, "transfer": 0}, 8, 4,
        gold={held[0].id: {}, "not generated": {}})
    assert "leaderboard_accuracy" not in scores and "transfer_accuracy" not in scores
    assert not any(k.startswith("leaderboard_") for k in items)
    assert gold_nll == {held[0].id: 1.5}  # the generated items' gold sums, by id


def test_gold_after_prompt_splits_off_only_what_follows_the_exact_unscored_prompt():
    gold = {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, IGNORE, IGNORE, 4, 5]}
    assert gold_after_prompt([1, 2, 3], gold) == ([4, 5], [True, True])
    assert gold_after_prompt([1, 2], gold) == ([3, 4, 5], [False, True, True])
    assert gold_after_prompt([1, 9, 3], gold) is None  # the rendering tokenized otherwise
    assert gold_after_prompt([1, 2, 3, 4], gold) is None  # a scored token in the prompt
    assert gold_after_prompt([1, 2, 3, 4, 5], gold) is None  # nothing after it


@pytest.fixture(scope="module")
def bfcl_task(converted_smollm2):
    from transformers import AutoTokenizer

    from loki_exp.config_check import check_section

    tok = AutoTokenizer.from_pretrained(converted_smollm2)
    cfg = check_section("dataset", {"name": "bfcl", "source": "offline", "categories": TRAINED,
                            "test_fraction": 0.2, "irrelevance_share": 0.3, "overflow": "drop",
                            "max_length": 1152})
    return load_task(cfg, tokenizer=tok), tok


def test_bfcl_trains_irrelevance_items_at_their_share_and_never_a_held_out_id(bfcl_task):
    task, tok = bfcl_task
    calls = [e for e in task.train if e.category not in bfcl.IRRELEVANCE]
    irrelevant = [e for e in task.train if e.category in bfcl.IRRELEVANCE]
    assert len(calls) == 691 and len(irrelevant) == round(0.3 / 0.7 * 691)
    assert {e.category for e in irrelevant} == set(bfcl.IRRELEVANCE)
    assert all(e.response == bfcl.NO_CALL_ANSWER for e in irrelevant)
    assert all(encode(tok, e, 1152) is not None for e in irrelevant)  # drawn among those that fit
    # Per category: no held-out id (the evaluation's split) is ever trained.
    trained_ids = {e.id for e in task.train}
    for category in (*TRAINED, *bfcl.IRRELEVANCE):
        held = bfcl.heldout_by_category([category], 0.2, None)[category]
        assert held and not trained_ids & {i.id for i in held}, category
    # The plain-text answer is right on an irrelevance item, as the matcher scores it.
    from loki_exp.evaluation.task_metric import bfcl_correct

    held = bfcl.heldout_by_category(["irrelevance"], 0.2, 1)["irrelevance"][0]
    assert bfcl_correct(bfcl.NO_CALL_ANSWER, held)


def test_irrelevance_share_zero_trains_calls_only():
    split = bfcl.load_split(TRAINED, 0.2, irrelevance_share=0.0)
    assert {i.category for i in split.train} == set(TRAINED)


def test_held_out_samples_are_evenly_drawn_and_stable():
    held = bfcl.heldout_by_category(TRAINED, 0.2, 30)
    assert {c: len(v) for c, v in held.items()} == {c: 30 for c in TRAINED}
    again = bfcl.heldout_by_category(TRAINED, 0.2, 30)
    assert [i.id for i in held["multiple"]] == [i.id for i in again["multiple"]]
    # A random sample of the split, not its first 30 (the files are ordered by id).
    everything = bfcl.heldout_by_category(["simple_python"], 0.2, None)["simple_python"]
    assert [i.id for i in held["simple_python"]] != [i.id for i in everything[:30]]


def test_data_lost_to_max_length_is_counted_per_category_and_warned(tiny_models, caplog):
    from loki_exp.implant.fit import warn_data_loss

    tok = tiny_models["tiny_llama"].tokenizer
    short = Example("s", [{"role": "user", "content": "Hi"}], "[f()]", category="a")
    long = Example("l", [{"role": "user", "content": "word " * 200}], "[f()]", category="b")
    kept, counts = encode_all(tok, [short, short, long, short], 64)
    assert len(kept) == 3
    assert counts.as_dict() == {"a": {"examples": 3, "kept": 3, "dropped": 0, "truncated": 0},
                                "b": {"examples": 1, "kept": 0, "dropped": 1, "truncated": 0}}
    with caplog.at_level(logging.WARNING):
        warn_data_loss("t", counts, 64, "drop")
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["t: max_length=64 drops more than 5% of a category's training examples "
                        "(b 100%); raise dataset.max_length"]
    # Cut: a long answer keeps its head; a long prompt leaves nothing to learn, so it drops.
    long_answer = Example("t", [{"role": "user", "content": "Hi"}], "[f(x='" + "a " * 100 + "')]",
                          category="c")
    _, cut = encode_all(tok, [long_answer, long], 64, "truncate")
    assert cut.as_dict() == {"b": {"examples": 1, "kept": 0, "dropped": 1, "truncated": 0},
                             "c": {"examples": 1, "kept": 1, "dropped": 0, "truncated": 1}}


def test_every_shipped_bfcl_experiment_keeps_99_percent_of_each_category(compose_cfg,
                                                                         converted_smollm2):
    """Measured with SmolLM2's tokenizer, the shipped experiments' data as they train it."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from tests.support.paths import CONF_DIR

    tok = AutoTokenizer.from_pretrained(converted_smollm2)
    seen = {}
    for path in sorted(Path(CONF_DIR, "experiment").glob("*.yaml")):
        cfg = compose_cfg(f"experiment={path.stem}")
        if cfg.model.name != "SmolLM2-135M-Instruct" or cfg.dataset.name != "bfcl":
            continue
        key = str(cfg.dataset)
        if key not in seen:
            task = load_task(cfg.dataset, tokenizer=tok)
            _, counts = encode_all(tok, task.train, int(cfg.dataset.max_length), cfg.dataset.overflow)
            seen[key] = counts.as_dict()
        kept = {c: v["kept"] / v["examples"] for c, v in seen[key].items()}
        assert min(kept.values()) >= 0.99, (path.stem, kept)
    assert seen  # cpu_demo, smoke, the studies


def test_random_rows_match_layer_balanced_counts_and_follow_the_seed():
    one = select_random(10, 30, 576, seed=0)
    assert [len(r) for r in one] == [node_budget(10, 30, 576) // 30] * 30
    assert all(r == sorted(set(r)) and 0 <= r[0] and r[-1] < 576 for r in one)
    assert select_random(10, 30, 576, seed=0) == one
    other = select_random(10, 30, 576, seed=1)
    overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(one, other)])
    assert 0.0 < overlap < 0.25  # two uniform draws of 10% share about 10% of their rows


def test_length_grouping_on_bfcl_pads_far_less(bfcl_task):
    """The README's numbers: real tokens over padded ones in BFCL's training batches (batch 4,
    seed 42), shuffled against grouped by length, in one process and over 2 ranks."""
    from loki_exp.data.sft import GlobalBatchSampler, real_token_share

    task, tok = bfcl_task
    encoded, _ = encode_all(tok, task.train, 1152)
    lengths = [len(e["input_ids"]) for e in encoded]
    shares = {(world, by is not None): real_token_share(
        GlobalBatchSampler(len(lengths), 4, 0, world, 42, by).global_batches(), lengths, world)
        for world in (1, 2) for by in (None, lengths)}
    assert shares == pytest.approx({(1, False): 0.658, (1, True): 0.987, (2, False): 0.801,
                                    (2, True): 0.996}, abs=0.0005)


def test_the_bfcl_sizes_the_configs_and_readme_cite(bfcl_task):
    """dataset=bfcl's comments and the README: 167 held-out items of the trained categories;
    multiple's longest example is 1,108 SmolLM2 tokens (768 dropped 29 of its 166, 17%); a
    held-in live_irrelevance prompt runs to 4,189; irrelevance is 1,120 of the leaderboard's
    3,471 items."""
    task, tok = bfcl_task
    assert len(task.test) == 167
    multiple = [len(encode(tok, e, 1 << 30)["input_ids"]) for e in task.train
                if e.category == "multiple"]
    assert max(multiple) == 1108 and sum(n > 768 for n in multiple) == 29
    items, _ = bfcl.load_items(list(bfcl.LEADERBOARD), known=bfcl.CATEGORIES + bfcl.IRRELEVANCE)
    assert len(items) == 3471 and sum(i.category in bfcl.IRRELEVANCE for i in items) == 1120
    from loki_exp.data.tasks import _bfcl_example

    live = [i for i in items if i.category == "live_irrelevance"
            and not bfcl.in_test_split(i.id, 0.2)]
    assert max(len(encode(tok, _bfcl_example(i), 1 << 30)["input_ids"]) for i in live) == 4189
