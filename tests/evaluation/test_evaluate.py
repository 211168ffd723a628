import pytest

from loki_exp.errors import LokiError
from loki_exp.evaluation.bfcl_match import matches, parse_calls
from loki_exp.evaluation.scores import forgetting_avg
from tests.support.tolerances import FLOAT32_STEPS

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
    from loki_exp.evaluation.lm_eval_tasks import task_dir
    from loki_exp.evaluation.suite import make_lm, run_suite

    loaded = tiny_models["tiny_qwen"]
    scores, items = run_suite(make_lm(loaded.model, loaded.tokenizer, 4),
                              ["arc_easy", "winogrande"], limit=6)
    for task in ("arc_easy", "winogrande"):
        assert set(scores[task]) == {"acc", "acc_norm"}
        assert all(0.0 <= v <= 1.0 for v in scores[task].values())
        # Per item, in document order: their mean is the score.
        for metric, value in scores[task].items():
            assert len(items[task][metric]) == 6 and set(items[task][metric]) <= {0.0, 1.0}
            assert sum(items[task][metric]) / 6 == pytest.approx(value)
    yaml = (task_dir(["winogrande"]) / "winogrande.yaml").read_text()
    assert 'doc_to_choice: "{{contexts}}"' in yaml and "dataset_path: json" in yaml
    with pytest.raises(LokiError, match="offline benchmarks are"):
        task_dir(["mmlu_pro"])


def test_flat_metrics_carry_paired_intervals_and_signed_forgetting():
    from loki_exp.evaluation.evaluate import flat_metrics

    before = {"bench": {"arc": {"acc": 0.5}}, "bpb": {"gsm8k": 1.0}, "task": {"accuracy": 0.1},
              "items": {"bench/arc/acc": [1.0, 0.0] * 50, "bpb/gsm8k": [1.0] * 100,
                        "task/bfcl/accuracy": [0.0] * 90 + [1.0] * 10,
                        "drift/format_damage": [0.0] * 10}}
    after = {"bench": {"arc": {"acc": 0.4}}, "bpb": {"gsm8k": 1.2}, "task": {"accuracy": 0.5},
             "items": {"bench/arc/acc": [1.0, 0.0] * 40 + [0.0] * 20, "bpb/gsm8k": [1.2] * 100,
                       "task/bfcl/accuracy": [0.0] * 50 + [1.0] * 50,
                       "drift/format_damage": [1.0] * 3 + [0.0] * 7,
                       "drift/kl": [0.1, 0.3, 0.2]}}
    m = flat_metrics("bfcl", before, after, "acc")
    assert m["task/bfcl/accuracy/delta"] == pytest.approx(0.4)
    assert m["task/bfcl/accuracy/delta/ci_low"] > 0.25  # 40 of 100 items went right
    assert m["bench/arc/acc/delta/ci_high"] < 0  # 10 of 100 went wrong
    # bits per byte rose 20% (worse), accuracy fell 20%: both +20 in the signed Avg.
    assert m["bpb/gsm8k/delta"] == pytest.approx(0.2)
    assert m["forgetting/avg_benchmarks"] == pytest.approx(20.0)
    assert m["forgetting/avg"] == pytest.approx(20.0)
    assert m["forgetting/avg/ci_low"] < 20.0 < m["forgetting/avg/ci_high"]
    assert m["drift/format_damage/after"] == pytest.approx(0.3)
    assert m["drift/kl/after"] == pytest.approx(0.2)
    assert 0 < m["drift/kl/ci_low"] < 0.2 < m["drift/kl/ci_high"]


def test_bfcl_overall_gain_gets_an_interval_resampled_by_category():
    from loki_exp.evaluation.evaluate import flat_metrics
    from tests.support.scores import bfcl_category_scores

    # simple: 0 -> 30 of 40 right; irrelevance: 40 -> 34 of 40 right. Overall +0.3.
    m = flat_metrics("bfcl", bfcl_category_scores([0.0] * 40, [1.0] * 40),
                     bfcl_category_scores([1.0] * 30 + [0.0] * 10, [1.0] * 34 + [0.0] * 6), "acc")
    key = "task/bfcl/leaderboard_accuracy"
    assert m[f"{key}/delta"] == pytest.approx(0.3)
    assert 0.2 < m[f"{key}/delta/ci_low"] < 0.3 < m[f"{key}/delta/ci_high"]
    assert m[f"{key}/irrelevance/delta/ci_high"] < 0


def test_bfcl_irrelevance_scores_calling_nothing_as_right():
    from loki_exp.data.bfcl import IRRELEVANCE, heldout_by_category
    from loki_exp.evaluation.task_metric import bfcl_correct

    held = heldout_by_category(["irrelevance", "simple_python"], 0.2, 5)
    irrelevant = held["irrelevance"][0]
    assert irrelevant.category in IRRELEVANCE and irrelevant.ground_truth == []
    assert len(held["irrelevance"]) == 5 and len(held["simple_python"]) == 5
    for text, right in [("None of the functions can compute a triangle's area.", True),
                        ("[]", True),
                        ("[determine_body_mass_index(weight=10, height=5)]", False),
                        ("determine_body_mass_index(10, 5)", False),
                        ('{"name": "determine_body_mass_index", "arguments": {}}', False)]:
        assert bfcl_correct(text, irrelevant) is right, text
    simple = held["simple_python"][0]
    assert bfcl_correct(simple.target, simple) and not bfcl_correct("I cannot.", simple)


def test_an_evaluation_loads_the_base_model_once(compose_cfg, tiny_models, tmp_path, monkeypatch):
    """Uncached, the base's scores and the KL drift share one load of the base model (they
    used to load it twice); cached, the KL alone loads it. The drift questions are read
    from the wheel once per process."""
    from loki_exp.data.tasks import load_task
    from loki_exp.evaluation import drift, evaluate
    from tests.support.caches import linked_cache

    cfg = compose_cfg("model=tiny_llama", "eval.benchmarks=[]", "eval.bpb=[naturalqs]",
                      "eval.bpb_limit=2", "eval.drift_prompts=2", "eval.drift_max_new_tokens=4",
                      "eval.task_bpb_items=1", "eval.bfcl_trained_items=1",
                      "eval.bfcl_irrelevance_items=0", "eval.bfcl_transfer_items=0",
                      "eval.max_new_tokens=4",
                      # linked: the tiny model's tokenizer is read from the converted SmolLM2
                      # (a bare cache would convert its GGUF again, 20 s)
                      f"paths.cache_dir={linked_cache(tmp_path / 'cache')}",
                      f"paths.output_dir={tmp_path / 'run'}")
    loads, reads = [], []
    real_load, real_gold = evaluate.load_model, drift.load_gold
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(drift, "load_gold", lambda *a, **k: reads.append(a[0]) or real_gold(*a, **k))
    drift._questions.cache_clear()
    task = load_task(cfg.dataset)
    (tmp_path / "run").mkdir()
    loaded = tiny_models["tiny_llama"]
    first = evaluate.run_evaluate(cfg, loaded, task, tmp_path / "run")
    assert len(loads) == 1 and sorted(reads) == ["gsm8k", "jeopardy", "naturalqs"]
    second = evaluate.run_evaluate(cfg, loaded, task, tmp_path / "run")
    assert len(loads) == 2 and len(reads) == 3
    assert first["drift/kl/after"] == second["drift/kl/after"] == 0.0  # the base against itself


def test_gold_bpb_of_the_items_bfcl_prompts_comes_from_its_prompt_caches(compose_cfg, tiny_models,
                                                                          tmp_path, monkeypatch):
    """An uncached evaluation generates BFCL's calls first and scores the gold answers of the
    held-out items it prompts over their prompt caches (one per trained category here), so
    gold bpb runs only the others: every item's value equals gold bpb run on all of them
    alone (float64), and the cheap part is the same as ``score_cheap``'s."""
    from loki_exp.data.tasks import load_task
    from loki_exp.evaluation import evaluate

    cfg = compose_cfg("model=tiny_llama", "eval.benchmarks=[]", "eval.bpb=[]",
                      "eval.drift_prompts=0", "eval.task_bpb_items=2",
                      "eval.bfcl_trained_items=1", "eval.bfcl_irrelevance_items=1",
                      "eval.bfcl_transfer_items=0", "eval.max_new_tokens=4",
                      f"paths.output_dir={tmp_path}")
    task = load_task(cfg.dataset)
    known = []
    real = evaluate.gold_bpb
    monkeypatch.setattr(evaluate, "gold_bpb",
                        lambda *a: known.append(dict(a[4] or {})) or real(*a))
    model, tok = tiny_models["tiny_llama"].model.double(), tiny_models["tiny_llama"].tokenizer
    try:
        scores, cheap = evaluate.score_model_and_cheap(cfg, model, tok, task)
        alone = evaluate.score_cheap(cfg, model, tok, task)
    finally:
        model.float()
    heldout = {i.id for i in evaluate.task_heldout(task, 2)}
    assert len(heldout) == 2 * len(task.categories)
    assert len(known[0]) == len(task.categories) and set(known[0]) < heldout and known[1] == {}
    key = "task/bfcl/gold_bpb"
    # Both paths sum the same float64 log-probabilities over differently shaped batches: they
    # differ by float64 rounding (~1e-15). FLOAT32_STEPS (tolerances.py: a few float32 steps,
    # as Gemma's norms would add) bounds it from above; a wrong position moves it by 1e-2.
    assert cheap["items"][key] == pytest.approx(alone["items"][key], rel=FLOAT32_STEPS)
    assert scores["items"][key] == cheap["items"][key]
    assert scores["task"]["gold_bpb"] == pytest.approx(alone["task"]["gold_bpb"], rel=FLOAT32_STEPS)


def test_base_scores_write_their_cheap_part_and_reuse_a_cached_one(compose_cfg, tiny_models,
                                                                   tmp_path, monkeypatch):
    """Uncached, the base's scores write the part a curve needs (``.cheap``) from the same pass,
    as ``base_cheap_scores`` would compute it (gold bpb to float rounding, float64); with only
    that part cached, it is read, not computed again."""
    import json

    from loki_exp.data.tasks import load_task
    from loki_exp.evaluation import evaluate
    from tests.support.caches import linked_cache

    cfg = compose_cfg("model=tiny_llama", "eval.benchmarks=[]", "eval.bpb=[naturalqs]",
                      "eval.bpb_limit=2", "eval.drift_prompts=2", "eval.drift_max_new_tokens=4",
                      "eval.task_bpb_items=2", "eval.bfcl_trained_items=1",
                      "eval.bfcl_irrelevance_items=0", "eval.bfcl_transfer_items=0",
                      "eval.max_new_tokens=4", f"paths.cache_dir={linked_cache(tmp_path / 'c')}",
                      f"paths.output_dir={tmp_path}")
    task, loaded = load_task(cfg.dataset), tiny_models["tiny_llama"]
    base = evaluate.BaseModel(cfg, loaded)
    model = loaded.model.double()
    try:
        scores = evaluate.base_scores(cfg, loaded, task, base)
        cheap_path = evaluate._base_path(cfg, loaded, task, ".cheap")
        written = json.loads(cheap_path.read_text())
        alone = evaluate.score_cheap(cfg, model, loaded.tokenizer, task, answers=True)
        evaluate._base_path(cfg, loaded, task).unlink()
        calls = []
        monkeypatch.setattr(evaluate, "score_cheap", lambda *a, **k: calls.append(1))
        again = evaluate.base_scores(cfg, loaded, task, base)
    finally:
        model.float()
    key = "task/bfcl/gold_bpb"
    # float64 on both paths, shapes differing: rounding far inside FLOAT32_STEPS (test above)
    assert written["items"][key] == pytest.approx(alone["items"][key], rel=FLOAT32_STEPS)
    assert {k: v for k, v in written["items"].items() if k != key} == \
        {k: v for k, v in alone["items"].items() if k != key}
    assert written["drift"] == alone["drift"] and written["bpb"] == alone["bpb"]
    assert calls == [] and again == scores  # the cheap part read back, the rest recomputed


def test_a_curve_point_measures_in_eval_mode_and_restores_the_mode(compose_cfg, tiny_models,
                                                                   tmp_path, monkeypatch):
    """Without bpb sets nothing else switches the model to eval mode: the KL pass must not run
    in training mode (dropout), and the model goes back to training afterwards."""
    from loki_exp.data.tasks import load_task
    from loki_exp.evaluation import curves

    cfg = compose_cfg("model=tiny_llama", "eval.bpb=[]", "eval.drift_prompts=2",
                      "eval.drift_max_new_tokens=4", "eval.task_bpb_items=1",
                      f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path}")
    loaded = tiny_models["tiny_llama"]
    evaluator = curves.CurveEvaluator(cfg, loaded, load_task(cfg.dataset))
    modes = []
    real = curves.answer_logprobs
    monkeypatch.setattr(curves, "answer_logprobs",
                        lambda model, *a: modes.append(model.training) or real(model, *a))
    loaded.model.train()
    try:
        point = evaluator.measure(loaded.model)
        assert modes == [False] and loaded.model.training
    finally:
        loaded.model.eval()
    assert point["metrics"]["drift/kl/after"] == 0.0
