import pytest

from loki_exp.errors import LokiError
from loki_exp.evaluation.bfcl_match import matches, parse_calls
from loki_exp.evaluation.scores import forgetting_avg

AREA = [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]
SPOTIFY = [{"spotify.play": {"artist": ["Taylor Swift"], "duration": [20]}},
           {"spotify.play": {"artist": ["Maroon 5"], "duration": [15]}}]


@pytest.mark.parametrize("text,ok", [
    ("[calculate_triangle_area(base=10, height=5, unit='units')]", True),   # right
    ("[calculate_triangle_area(base=10, height=5)]", True),                 # optional omitted
    ("calculate_triangle_area(height=5, base=10.0)", True),                 # bare call, 10.0 == 10
    ("[triangle_area(base=10, height=5)]", False),                          # wrong name
    ("[calculate_triangle_area(base=12, height=5)]", False),                # wrong value
    ("[calculate_triangle_area(base=10)]", False),                          # missing required
    ("[calculate_triangle_area(base=10, height=5, color='red')]", False),   # unknown argument
    ("[calculate_triangle_area(10, 5)]", False),                            # positional
    ("The area is 25.", False),                                             # prose
    ("[calculate_triangle_area(base=10, height=5), calculate_triangle_area(base=1, height=1)]",
     False),                                                                # extra call
])
def test_single_call(text, ok):
    assert matches(text, AREA) is ok


def test_parallel_calls_in_any_order_and_string_normalisation():
    assert matches("[spotify.play(artist='Maroon 5', duration=15), "
                   "spotify.play(artist='taylor swift', duration=20)]", SPOTIFY)
    assert not matches("[spotify.play(artist='Maroon 5', duration=20), "
                       "spotify.play(artist='Taylor Swift', duration=15)]", SPOTIFY)
    assert not matches("[spotify.play(artist='Maroon 5', duration=15)]", SPOTIFY)


def test_parse_never_evaluates():
    assert parse_calls("[f(x=__import__('os').system('echo hi'))]") is None
    assert parse_calls("[f(x=[1, {'a': 2}])]") == [("f", {"x": [1, {"a": 2}]})]


def test_forgetting_avg_on_known_numbers():
    before = {"arc_easy": 0.50, "hellaswag": 0.40}
    after = {"arc_easy": 0.45, "hellaswag": 0.42}
    # (0.05/0.50 + -0.02/0.40) / 2 * 100 = (10% - 5%) / 2
    assert forgetting_avg(before, after) == pytest.approx(2.5)
    assert forgetting_avg(before, before) == 0.0
    with pytest.raises(LokiError, match="same benchmarks"):
        forgetting_avg(before, {"arc_easy": 0.4})
    with pytest.raises(LokiError, match="base score is 0"):
        forgetting_avg({"a": 0.0}, {"a": 0.1})


def test_lm_eval_offline_tasks_on_a_tiny_model(tiny_models, tmp_path):
    """Both task forms (shared context; WinoGrande's one context per choice) score in [0, 1]."""
    from loki_exp.evaluation.benchmarks import run_suite, task_dir

    loaded = tiny_models["tiny_qwen"]
    scores = run_suite(loaded.model, loaded.tokenizer, ["arc_easy", "winogrande"], limit=6,
                       batch_size=4)
    for task in ("arc_easy", "winogrande"):
        assert set(scores[task]) == {"acc", "acc_norm"}
        assert all(0.0 <= v <= 1.0 for v in scores[task].values())
    yaml = (task_dir(["winogrande"]) / "winogrande.yaml").read_text()
    assert 'doc_to_choice: "{{contexts}}"' in yaml and "dataset_path: json" in yaml
    with pytest.raises(LokiError, match="offline benchmarks are"):
        task_dir(["mmlu_pro"])
