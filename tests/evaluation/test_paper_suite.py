"""eval=paper: the generative suite's tasks, filters and metrics, offline on local items."""

import json

import pytest
from lm_eval.api.model import LM

from loki_exp.errors import LokiError
from loki_exp.evaluation.paper_suite import PAPER_TASKS, code_of, write_offline_items
from loki_exp.evaluation.suite import make_lm, run_suite

# IFEval-style prompts with checks that need no nltk data, and an answer that follows each.
IFEVAL = [
    ({"key": 1, "prompt": "Describe a cat in one sentence without using any commas.",
      "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
     "A cat is a small furry animal that purrs."),
    ({"key": 2, "prompt": "Say hello to the world, in lowercase letters only.",
      "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
     "hello world, nice to meet you."),
    ({"key": 3, "prompt": "Name a fruit. End your answer with the exact phrase 'Is there "
      "anything else I can help with?'", "instruction_id_list": ["startend:end_checker"],
      "kwargs": [{"end_phrase": "Is there anything else I can help with?"}]},
     "An apple. Is there anything else I can help with?"),
]


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = write_offline_items(tmp_path_factory.mktemp("paper"), 6)
    (root / "ifeval.jsonl").write_text("".join(json.dumps(d) + "\n" for d, _ in IFEVAL))
    return root


class Oracle(LM):
    """Answers each generation request from its document: right, or deliberately wrong."""

    def __init__(self, right: bool):
        super().__init__()
        self.right = right
        self.prompts: list[str] = []

    tokenizer_name = "oracle"

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}\n" for m in chat_history)

    def answer(self, doc) -> str:
        if isinstance(doc.get("answer"), dict):  # TriviaQA
            return doc["answer"]["aliases"][0] if self.right else "Atlantis"
        if "canonical_solution" in doc:  # HumanEval: the whole function, fenced
            body = doc["canonical_solution"] if self.right else "    return None\n"
            return f"Sure:\n```python\n{doc['prompt']}{body}```\nDone."
        if "instruction_id_list" in doc:
            good = dict((d["key"], a) for d, a in IFEVAL)[doc["key"]]
            return good if self.right else "WRONG, ANSWER, HERE"
        if "sentences" in doc or "choices" in doc:
            letter = "ABCD"[int(doc["gold"]) if self.right else (int(doc["gold"]) + 1) % 2]
            return f"The answer is {letter}."
        if "question" in doc:  # GSM8K: the reference solution ends "#### <number>"
            return doc["answer"] if self.right else "It is #### 123456789"
        raise AssertionError(f"unexpected document {doc}")

    def generate_until(self, requests, disable_tqdm=False):
        self.prompts += [r.args[0] for r in requests]
        return [self.answer(r.doc) for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise AssertionError("the paper suite is generative")

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise AssertionError("the paper suite is generative")


# Right answers run HumanEval's tests in its sandboxed child processes (5 s): slow.
@pytest.mark.parametrize("right", [pytest.param(True, marks=pytest.mark.slow), False])
def test_each_task_scores_right_answers_1_and_wrong_answers_0(items, right):
    oracle = Oracle(right)
    scores, per_item = run_suite(oracle, list(PAPER_TASKS), 3, "paper", paper_data=items,
                                 allow_code=True)
    expected = 1.0 if right else 0.0
    assert scores == {
        "triviaqa": {"exact_match": expected},
        "gsm8k": {"exact_match": expected, "exact_match_strict": expected},
        "hellaswag": {"exact_match": expected}, "winogrande": {"exact_match": expected},
        "humaneval": {"pass@1": expected},
        "ifeval": {"prompt_level_strict_acc": expected, "prompt_level_loose_acc": expected},
    }
    assert all(len(v) == 3 and set(v) == {expected} for t in per_item.values() for v in t.values())
    # Chat-templated, few-shot GSM8K as turns, options lettered in the generative forms.
    assert all(p.startswith("<user>") for p in oracle.prompts)
    assert sum(p.count("<assistant>") for p in oracle.prompts if "Question:" in p) >= 5
    assert any("\nD. " in p and "Which ending" in p for p in oracle.prompts)


def test_ifeval_language_checks_give_one_answer_per_text(items):
    """langdetect samples at random unless seeded (unseeded, this text is Dutch about one time
    in twenty): a suite with IFEval seeds it, so an IFEval score does not change between runs."""
    import langdetect

    run_suite(Oracle(True), ["ifeval"], 1, "paper", paper_data=items)
    assert {langdetect.detect("hello world, nice to meet you.") for _ in range(100)} == {"en"}


def test_humaneval_runs_no_code_without_opt_in(items):
    with pytest.raises(Exception, match="unsafe"):
        run_suite(Oracle(True), ["humaneval"], 1, "paper", paper_data=items)


def test_code_is_taken_from_the_first_fenced_block():
    assert code_of("Here:\n```python\ndef f():\n    return 1\n```\nbye") == "def f():\n    return 1\n"
    assert code_of("    return 1\n") == "    return 1\n"


def test_tiny_model_returns_a_number_for_each_task(items, tiny_models):
    loaded = tiny_models["tiny_llama"]
    lm = make_lm(loaded.model, loaded.tokenizer, 4)
    scores, per_item = run_suite(lm, list(PAPER_TASKS), 1, "paper", paper_data=items,
                                 allow_code=True, max_new_tokens=8)
    assert set(scores) == set(PAPER_TASKS)
    for task, metrics in scores.items():
        assert metrics and all(0.0 <= v <= 1.0 for v in metrics.values()), task
        assert all(len(v) == 1 for v in per_item[task].values())


def test_paper_config_checks(compose_raw, tmp_path):
    from loki_exp.config_check import check_config

    def check_eval(cfg):
        check_config(cfg, groups=("eval",))

    with pytest.raises(LokiError, match="eval.allow_code_execution=true"):
        check_eval(compose_raw("eval=paper"))
    check_eval(compose_raw("eval=paper", "eval.allow_code_execution=true"))
    with pytest.raises(LokiError, match=r"eval.benchmarks has \['arc_easy'\]"):
        check_eval(compose_raw("eval=paper", "eval.benchmarks=[arc_easy]"))
    with pytest.raises(LokiError, match="has no gsm8k.jsonl"):
        run_suite(Oracle(True), ["gsm8k"], 1, "paper", paper_data=tmp_path)
    with pytest.raises(LokiError, match=r"eval.forgetting_metric='acc_nrom' is not known"):
        check_eval(compose_raw("eval.forgetting_metric=acc_nrom"))  # fell back to acc
    with pytest.raises(LokiError, match="eval.paper_data='/no/such/dir' is not a directory"):
        check_eval(compose_raw("eval=paper", "eval.allow_code_execution=true",
                               "eval.paper_data=/no/such/dir"))


def test_forgetting_uses_each_generative_task_s_primary_score():
    from loki_exp.evaluation.evaluate import flat_metrics

    def scores(em, strict):
        return {"task": {"accuracy": 0.5},
                "bench": {"gsm8k": {"exact_match": em, "exact_match_strict": strict},
                          "ifeval": {"prompt_level_strict_acc": em,
                                     "prompt_level_loose_acc": strict}},
                "items": {"bench/gsm8k/exact_match": [em] * 4,
                          "bench/ifeval/prompt_level_strict_acc": [em] * 4}}

    # eval.forgetting_metric stays acc_norm (the default group's): no paper task has it.
    m = flat_metrics("bfcl", scores(0.5, 0.9), scores(0.25, 0.1), "acc_norm")
    assert m["forgetting/avg_benchmarks"] == pytest.approx(50.0)  # the primaries halved
    assert m["bench/gsm8k/exact_match_strict/delta"] == pytest.approx(-0.8)
