"""KVA: the fast exact engine against Captum's per-layer reference, and the cached store."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from loki_exp.errors import LokiError
from loki_exp.kva.engine import CaptumKVA, FastKVA, KVASettings
from loki_exp.kva.first_commit import first_commit_kva
from loki_exp.kva.lightning import KVAStoreWriter, common_prefix
from loki_exp.kva.stage import run_analyse
from loki_exp.kva.store import StoreView, partial_dir
from loki_exp.selection import select_layer_balanced
from tests.support.prompts import mmlu_prompts
from tests.support.tolerances import assert_close_fp32


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen"])
@pytest.mark.parametrize("baseline", ["zero", "token"])
@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
def test_fast_equals_captum_reference(tiny_models, model, baseline, method):
    loaded = tiny_models[model]
    kw = dict(method=method, baseline=baseline, steps=5)
    fast = FastKVA(loaded.model, KVASettings(**kw))
    ref = CaptumKVA(loaded.model, KVASettings(engine="captum", **kw))
    fast_scores, ref_scores = [], []
    for ids in mmlu_prompts(loaded.tokenizer):
        a, b = fast(ids), ref(ids)
        assert a.target_token == b.target_token
        assert a.target_prob == pytest.approx(b.target_prob, rel=1e-6)
        assert b.scores.abs().max() > 0
        assert (a.scores - b.scores).abs().max() <= 1e-4 * b.scores.abs().max()
        fast_scores.append(a.scores.numpy())
        ref_scores.append(b.scores.numpy())
    assert select_layer_balanced(np.stack(fast_scores), 30) == \
        select_layer_balanced(np.stack(ref_scores), 30)


def test_zero_and_token_baselines_differ(tiny_models):
    loaded = tiny_models["tiny_llama"]
    ids = mmlu_prompts(loaded.tokenizer, 1)[0]
    zero = FastKVA(loaded.model, KVASettings(baseline="zero"))(ids).scores
    token = FastKVA(loaded.model, KVASettings(baseline="token"))(ids).scores
    assert not torch.allclose(zero, token)


def test_last_position_variant_matches_an_independent_computation(tiny_models):
    """scale_positions=last == IG on the last position's down_proj output only (Captum)."""
    from captum.attr import IntegratedGradients

    from loki_exp.model_access import down_projs

    loaded = tiny_models["tiny_qwen"]
    model = loaded.model
    ids = mmlu_prompts(loaded.tokenizer, 1)[0]
    fast = FastKVA(model, KVASettings(scale_positions="last", steps=6)).attribute(ids)
    for layer, proj in enumerate(down_projs(model)):
        with torch.no_grad():
            clean = []
            h = proj.register_forward_hook(lambda m, i, o, clean=clean: clean.append(o))
            model(ids)
            h.remove()
        z = clean[0]

        def injected(last: torch.Tensor, proj=proj, z=z) -> torch.Tensor:
            full = torch.cat([z.expand(last.shape[0], -1, -1)[:, :-1], last], dim=1)
            handle = proj.register_forward_hook(lambda m, i, o: full)
            try:
                out = model(ids.expand(last.shape[0], -1)).logits[:, -1].float()
            finally:
                handle.remove()
            return torch.softmax(out, -1)

        ref = IntegratedGradients(injected).attribute(z[:, -1:].detach(), baselines=0.0,
                                                      target=fast.target_token, n_steps=6,
                                                      method="riemann_trapezoid")
        ref = ref[0, 0]
        assert (fast.scores[layer] - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.parametrize("bad,match", [
    (dict(steps=0), "kva.steps=0 must be an integer >= 2"),
    (dict(method="simpson"), "kva.method='simpson' is not known"),
    (dict(baseline="mean"), "kva.baseline='mean' is not known"),
    (dict(scale_positions="first"), "kva.scale_positions='first' is not known"),
    (dict(engine="jax"), "kva.engine='jax' is not known"),
])
def test_bad_settings(bad, match):
    with pytest.raises(LokiError, match=match):
        KVASettings(**bad)


# -- the stage, the store and its cache --------------------------------------------------


def _cfg(compose_cfg, cache, *extra):
    # The exact all-positions definition in fp32 (paper_text with Captum's default rule).
    return compose_cfg("model=tiny_llama", "kva=paper_text", "kva.method=riemann_trapezoid",
                       "kva.limit=5", f"paths.cache_dir={cache}", "paths.output_dir=unused", *extra)


@pytest.mark.parametrize("model,batch", [("tiny_llama", 1), ("tiny_qwen", 1), ("tiny_llama", 3)])
def test_published_preset_equals_the_first_commit_algorithm(compose_cfg, tiny_models, tmp_path,
                                                            model, batch):
    loaded = tiny_models[model]
    cfg = compose_cfg(f"model={model}", "kva=published", "kva.dtype=float32",
                      "kva.store_dtype=float32", "kva.limit=3", f"kva.batch_size={batch}",
                      f"paths.cache_dir={tmp_path}", "paths.output_dir=unused")
    data, attrs = _read(run_analyse(cfg, loaded))
    assert (attrs["preset"], attrs["baseline"], attrs["scale_positions"], attrs["method"],
            attrs["steps"]) == ("published", "zero", "last", "riemann_left", 7)
    for row, prompt in enumerate(data["prompt"]):
        ids = loaded.tokenizer(prompt.decode(), return_tensors="pt", add_special_tokens=False).input_ids
        ref, target = first_commit_kva(loaded.model, ids, 7)
        assert data["target_token"][row] == target
        # Two float32 paths (batch 3 is left-padded): tests/support/tolerances.py. The float64 test
        # below shows the two algorithms equal.
        assert_close_fp32(torch.from_numpy(data["attributions"][row]), ref, prompt.decode()[:40])


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen"])
def test_published_definition_is_the_first_commit_algorithm_in_float64(tiny_models, model):
    """In float64 the engine's published path and the first commit's algorithm agree to the
    float32 rounding of their outputs alone: the same numbers, not just close ones."""
    import copy

    loaded = tiny_models[model]
    double = copy.deepcopy(loaded.model).double()
    engine = FastKVA(double, KVASettings(method="riemann_left", steps=7, baseline="zero",
                                         scale_positions="last"))  # the published definition
    for prompt in mmlu_prompts(loaded.tokenizer, 2):
        ref, target = first_commit_kva(double, prompt, 7)
        got = engine.attribute(prompt)
        assert got.target_token == target
        assert (got.scores - ref).abs().max() <= 4 * torch.finfo(torch.float32).eps * ref.abs().max()


def test_presets_record_their_settings_and_kva_leaves_the_model_dtype(compose_cfg, tiny_models,
                                                                     tmp_path):
    loaded = tiny_models["tiny_llama"]
    expected = {
        "published": ("zero", "last", "riemann_left", "bfloat16", "float16", "first", 0, "all"),
        "reference_captum": ("token", "all", "riemann_trapezoid", "float32", "float32", "first", 0,
                             "all_but_hs_math"),
        "paper_text": ("zero", "all", "riemann_right", "float32", "float32", "first", 0, "all"),
    }
    for preset, want in expected.items():
        cfg = compose_cfg("model=tiny_llama", f"kva={preset}", "kva.limit=2", "kva.steps=3",
                          f"paths.cache_dir={tmp_path}", "paths.output_dir=unused")
        data, attrs = _read(run_analyse(cfg, loaded))
        assert attrs["preset"] == preset
        assert (attrs["baseline"], attrs["scale_positions"], attrs["method"], attrs["dtype"],
                attrs["store_dtype"], attrs["probe_pick"], attrs["probe_shots"],
                attrs["probe_subjects"]) == want, preset
        assert data["attributions"].dtype == np.dtype(want[4])
        # KVA computes in its own dtype on its own copy: the model later stages train and
        # export keeps its dtype (published computes in bf16 on this fp32 model).
        assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_store_layout_provenance_and_cache_reuse(compose_cfg, tiny_models, tmp_path):
    cfg = _cfg(compose_cfg, tmp_path)
    loaded = tiny_models["tiny_llama"]
    path = run_analyse(cfg, loaded)
    data, attrs = _read(path)
    assert data["attributions"].shape == (5, 3, 64) and data["attributions"].dtype == np.float32
    assert len(set(data["sample_id"])) == 5 and data["prompt"][0].decode().startswith("<|im_start|>")
    for key in ("model", "weights_fingerprint", "dtype", "steps", "method", "baseline",
                "scale_positions", "engine", "prompt_template", "probe_source", "probe_seed",
                "loki_exp_version", "created"):
        assert key in attrs, key
    assert attrs["baseline"] == "zero" and attrs["steps"] == 7 and attrs["dtype"] == "float32"
    # The same numbers as the engine run directly on the stored prompt, with the prefix
    # that all probe prompts share (and within float noise of the engine without it).
    tok = loaded.tokenizer
    all_ids = [tok(p.decode(), add_special_tokens=False).input_ids for p in data["prompt"]]
    prefix = common_prefix(all_ids)
    assert len(prefix) > 20  # the chat template and the instruction
    engine = FastKVA(loaded.model, KVASettings())
    engine.set_shared_prefix(torch.tensor(prefix))
    direct = engine.attribute(torch.tensor([all_ids[2]]))
    np.testing.assert_array_equal(data["attributions"][2], direct.scores.numpy())
    assert data["target_token"][2] == direct.target_token
    plain = FastKVA(loaded.model, KVASettings()).attribute(torch.tensor([all_ids[2]])).scores
    assert_close_fp32(direct.scores, plain, "shared prefix vs full pass")
    # A second call (another quota, strategy or method) reuses the store untouched.
    mtime = path.stat().st_mtime_ns
    assert run_analyse(_cfg(compose_cfg, tmp_path, "quota=30", "method=full"), loaded) == path
    assert path.stat().st_mtime_ns == mtime
    # A KVA setting changes the key.
    assert run_analyse(_cfg(compose_cfg, tmp_path, "kva.steps=3"), loaded) != path


def test_batch_4_equals_batch_1(compose_cfg, tiny_models, tmp_path, monkeypatch):
    """Stored by index whatever the order: batches of more than one prompt come longest first
    (less left padding), and the store is the same."""
    from loki_exp.kva import stage

    seen = []

    class Recording(stage.ProbeDataModule):
        def __init__(self, items, batch_size=1):
            seen.append([len(r["prompt"]) for r in items])
            super().__init__(items, batch_size)

    monkeypatch.setattr(stage, "ProbeDataModule", Recording)
    one = run_analyse(_cfg(compose_cfg, tmp_path / "a"), tiny_models["tiny_llama"])
    four = run_analyse(_cfg(compose_cfg, tmp_path / "b", "kva.batch_size=4"),
                       tiny_models["tiny_llama"])
    np.testing.assert_array_equal(_read(one)[0]["attributions"], _read(four)[0]["attributions"])
    assert seen[1] == sorted(seen[1], reverse=True) and seen[0] != seen[1]


class _Crash(RuntimeError):
    pass


def test_killed_after_k_samples_then_rerun_is_bit_identical(compose_cfg, tiny_models, tmp_path,
                                                            monkeypatch):
    loaded = tiny_models["tiny_llama"]
    reference = run_analyse(_cfg(compose_cfg, tmp_path / "ref"), loaded)

    original = KVAStoreWriter.write_on_batch_end
    written = []

    def crash_after_two(self, *args, **kwargs):
        original(self, *args, **kwargs)
        written.append(1)
        if len(written) == 2:
            raise _Crash("killed")

    monkeypatch.setattr(KVAStoreWriter, "write_on_batch_end", crash_after_two)
    cfg = _cfg(compose_cfg, tmp_path / "resumed")
    with pytest.raises(_Crash):
        run_analyse(cfg, loaded)
    monkeypatch.setattr(KVAStoreWriter, "write_on_batch_end", original)
    target = tmp_path / "resumed" / "kva" / "tiny-llama" / reference.name
    assert not target.exists()
    (shard,) = partial_dir(target).glob("*.h5")
    with h5py.File(shard, "r") as f:
        assert f.attrs["n_complete"] == 2
    computed = []
    attribute = FastKVA.attribute

    def counted(self, ids, record=None, layers=None):
        if record is None:  # not the engine's self-check
            computed.append(1)
        return attribute(self, ids, record, layers)

    monkeypatch.setattr(FastKVA, "attribute", counted)
    resumed = run_analyse(cfg, loaded)
    assert len(computed) == 3  # only the samples the crash lost
    ref_data, _ = _read(reference)
    res_data, _ = _read(resumed)
    for key in ("attributions", "sample_id", "prompt", "target_token", "target_prob"):
        np.testing.assert_array_equal(ref_data[key], res_data[key])
    assert not partial_dir(resumed).exists()


def test_a_corrupt_shard_is_recomputed(compose_cfg, tiny_models, tmp_path):
    cfg = _cfg(compose_cfg, tmp_path)
    path = run_analyse(cfg, tiny_models["tiny_llama"])
    expected = _read(path)[0]["attributions"]
    path.unlink()
    pdir = partial_dir(path)
    pdir.mkdir()
    (pdir / "dead-rank0.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    again = run_analyse(cfg, tiny_models["tiny_llama"])
    np.testing.assert_array_equal(_read(again)[0]["attributions"], expected)


def test_original_layout_reads(tmp_path):
    path = tmp_path / "kva_mmlu.h5"
    scores = np.random.default_rng(0).normal(size=(4, 3, 64)).astype(np.float16)
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset", data=scores, maxshape=(None, 3, 64))
        f.attrs["metadata_model"] = "Llama-3.1-8B-Instruct"
    with StoreView(path) as view:
        assert view.layout == "original" and view.shape == (4, 3, 64)
        assert view.attrs["model"] == "Llama-3.1-8B-Instruct"
        np.testing.assert_array_equal(np.concatenate(list(view.chunks(3))), scores.astype(np.float32))
        view.check_grid(3, 64)


def test_store_grid_mismatch_and_corrupt_store_are_clear_errors(compose_cfg, tiny_models,
                                                                tmp_path):
    cfg = _cfg(compose_cfg, tmp_path)
    path = run_analyse(cfg, tiny_models["tiny_llama"])
    with StoreView(path) as view, pytest.raises(LokiError, match=r"holds \[L, D\] = \[3, 64\], "
                                                               r"but the model has \[2, 48\]"):
        view.check_grid(2, 48)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])  # truncated
    with pytest.raises(LokiError, match="not a readable HDF5 file.*truncated or corrupt"):
        run_analyse(cfg, tiny_models["tiny_llama"])
    assert path.read_bytes() == good[: len(good) // 3]  # left for the user to inspect
    assert not partial_dir(path).exists()


def test_a_given_store_is_used_and_checked_against_the_model(compose_cfg, tiny_models, tmp_path):
    path = tmp_path / "kva_mmlu.h5"
    with h5py.File(path, "w") as f:  # the original code's layout
        f.create_dataset("dataset", data=np.zeros((2, 3, 64), np.float16))
    cfg = _cfg(compose_cfg, tmp_path, f"kva.store={path}")
    assert run_analyse(cfg, tiny_models["tiny_llama"]) == path
    with pytest.raises(LokiError, match=r"holds \[L, D\] = \[3, 64\], but the model has \[2, 48\]"):
        run_analyse(cfg, tiny_models["tiny_qwen"])
    with pytest.raises(LokiError, match="does not exist"):
        run_analyse(_cfg(compose_cfg, tmp_path, f"kva.store={tmp_path}/nope.h5"),
                    tiny_models["tiny_llama"])
