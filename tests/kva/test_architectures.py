"""The fast KVA engine equals the Captum reference on every model type it accepts, and
refuses the others (and any model whose forward it cannot reproduce) before any work."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients

from loki_exp.errors import LokiError
from loki_exp.kva.decoder_view import FAST_KVA_TYPES
from loki_exp.kva.engine import CaptumKVA, FastKVA, KVASettings
from loki_exp.kva.lightning import common_prefix
from loki_exp.model_access import down_projs
from tests.support.prompts import mmlu_prompts
from tests.support.tiny_decoders import tiny_decoder
from tests.support.tolerances import CROSS_PATH_FP32, assert_close_fp32


@pytest.fixture(scope="module")
def prompts(tiny_models):
    # Probe prompts (~100 tokens, longer than the 7-token sliding windows) sharing a prefix.
    return mmlu_prompts(tiny_models["tiny_llama"].tokenizer, 2)


def last_position_reference(model, ids, settings: KVASettings) -> torch.Tensor:
    """IG on the last position's down_proj output only, through hooks on the model itself."""
    projs = down_projs(model)
    with torch.no_grad():
        outs, base = [], []
        hooks = [p.register_forward_hook(lambda m, i, o: outs.append(o)) for p in projs]
        target = int(model(ids).logits[0, -1].argmax())
        for h in hooks:
            h.remove()
        if settings.baseline == "token":
            hooks = [p.register_forward_hook(lambda m, i, o: base.append(o)) for p in projs]
            model(torch.full_like(ids, settings.baseline_token_id))
            for h in hooks:
                h.remove()
    rows = []
    for layer, proj in enumerate(projs):
        z = outs[layer]

        def injected(last, proj=proj, z=z):
            full = torch.cat([z.expand(last.shape[0], -1, -1)[:, :-1], last], dim=1)
            handle = proj.register_forward_hook(lambda m, i, o: full)
            try:
                logits = model(ids.expand(last.shape[0], -1), logits_to_keep=1).logits
                return torch.softmax(logits[:, -1].float(), -1)
            finally:
                handle.remove()

        rows.append(IntegratedGradients(injected).attribute(
            z[:, -1:].detach(), baselines=base[layer][:, -1:] if base else 0.0, target=target,
            n_steps=settings.steps, method=settings.method)[0, 0])
    return torch.stack(rows).detach()


@pytest.mark.parametrize("model_type", FAST_KVA_TYPES)
@pytest.mark.parametrize("baseline", ["zero", "token"])
@pytest.mark.parametrize("scale_positions", ["all", "last"])
def test_fast_equals_reference_on_every_accepted_type(model_type, baseline, scale_positions,
                                                      prompts):
    model = tiny_decoder(model_type)
    settings = KVASettings(method="riemann_trapezoid", steps=4, baseline=baseline,
                           scale_positions=scale_positions)
    fast = FastKVA(model, settings)
    # As the analyse stage runs it: the prefix every probe prompt shares computed once.
    fast.set_shared_prefix(torch.tensor(common_prefix([p[0].tolist() for p in prompts])))
    for ids in prompts:
        got = fast(ids).scores
        if scale_positions == "all":
            ref = CaptumKVA(model, KVASettings(engine="captum", method="riemann_trapezoid",
                                               steps=4, baseline=baseline))(ids).scores
        else:
            ref = last_position_reference(model, ids, settings)
        assert ref.abs().max() > 0
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_a_type_outside_the_list_is_refused_and_captum_still_works(prompts):
    model = tiny_decoder("granite")  # residual_multiplier scales what each block adds
    with pytest.raises(LokiError, match=r"kva.engine=fast cannot attribute model type 'granite'"
                                        r" exactly \(supported: llama, .*\); use kva.engine=captum"):
        FastKVA(model, KVASettings())
    scores = CaptumKVA(model, KVASettings(engine="captum", steps=3))(prompts[0]).scores
    assert scores.shape == (4, 32) and scores.abs().max() > 0


def test_the_self_check_refuses_a_forward_the_engine_does_not_reproduce(monkeypatch):
    from loki_exp.kva import decoder_view

    model = tiny_decoder("gemma2")
    FastKVA(model, KVASettings(scale_positions="last"))  # the real view passes
    # A view that misses Gemma 2's post-feedforward norm (the old engine's assumption).
    real_of = decoder_view.DecoderView.of.__func__

    def without_branches(cls, m):
        view = real_of(cls, m)
        view.branches = [None] * len(view.branches)
        return view

    monkeypatch.setattr(decoder_view.DecoderView, "of", classmethod(without_branches))
    with pytest.raises(LokiError, match=r"model type 'gemma2' exactly \(its forward differs from "
                                        r"the engine's by .* at layer 0\); use kva.engine=captum"):
        FastKVA(model, KVASettings(scale_positions="last"))


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3_text", "olmo2"])
@pytest.mark.parametrize("baseline", ["zero", "token"])
def test_a_left_padded_batch_equals_one_prompt_at_a_time(model_type, baseline, tiny_models):
    """The published definition batched over prompts of different lengths (the GPU path):
    sdpa and eager masks (Gemma 2 runs eager), sliding windows, post-norm blocks."""
    model = tiny_decoder(model_type)
    fast = FastKVA(model, KVASettings(method="riemann_left", steps=7, baseline=baseline,
                                      scale_positions="last"))
    prompts = [p[0] for p in mmlu_prompts(tiny_models["tiny_llama"].tokenizer, 3)]
    assert len({p.numel() for p in prompts}) == 3
    # Two paths in float32 (a padded batch takes attention's masked kernels): tests/support/tolerances.py.
    # Its worst measured case is this test's gemma3_text prompt: 126.7 eps with AVX-512 kernels.
    # A padding error is orders larger: an attended pad key takes ~1/T (T ~ 100) of the weight.
    tolerance = CROSS_PATH_FP32
    for prompt, batched in zip(prompts, fast.attribute_batch(prompts)):
        one = fast(prompt.view(1, -1))
        assert batched.target_token == one.target_token
        assert batched.target_prob == pytest.approx(one.target_prob, rel=tolerance)
        assert (batched.scores - one.scores).abs().max() <= tolerance * one.scores.abs().max()


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
@pytest.mark.parametrize("scale_positions", ["all", "last"])
def test_some_layers_attributed_alone_equal_those_rows_of_all(model_type, scale_positions,
                                                               prompts):
    """Streams of non-adjacent layers in one group (what the self-check runs) give the rows
    and integration points of a full attribution. Tolerance: the same arithmetic in float32
    over batches of other sizes (the group's streams are stacked), so matmuls may sum in
    another order: the two-path case CROSS_PATH_FP32 bounds (tests/support/tolerances.py)."""
    model = tiny_decoder(model_type)
    fast = FastKVA(model, KVASettings(method="riemann_trapezoid", steps=4,
                                      scale_positions=scale_positions))
    last = len(fast.layers) - 1
    full_points, some_points = {}, {}
    with torch.enable_grad():
        full = fast.attribute(prompts[0], full_points)
        some = fast.attribute(prompts[0], some_points, layers=[0, last])
    assert some.target_token == full.target_token and sorted(some_points) == [0, last]
    assert_close_fp32(some.scores, full.scores[[0, last]], "scores")
    for layer in (0, last):
        assert_close_fp32(some_points[layer], full_points[layer], f"points of layer {layer}")


@pytest.mark.parametrize("scale_positions", ["all", "last"])
def test_the_self_check_runs_only_the_streams_it_needs(scale_positions, monkeypatch):
    """Its cost: the first layer's streams (through every later block), the second's (they
    join the first's, as a group's streams do) and the last's, not every layer's."""
    model = tiny_decoder("llama")
    groups = []
    for name in ("_stream_last_tokens", "_last_position_streams"):
        real = getattr(FastKVA, name)

        def spy(self, group, *args, real=real):
            groups.append(list(group))
            return real(self, group, *args)

        monkeypatch.setattr(FastKVA, name, spy)
    fast = FastKVA(model, KVASettings(scale_positions=scale_positions))
    assert len(fast.layers) == 4 and groups == [[0, 1, 3]]


@pytest.mark.parametrize("layers", [[3, 0], [0, 0], [-1], [4]])
def test_layers_out_of_order_or_range_are_refused(layers, prompts):
    fast = FastKVA(tiny_decoder("llama"), KVASettings(scale_positions="last"))
    with pytest.raises(ValueError, match=r"layers=.*: expected increasing layer numbers in 0\.\.3"):
        fast.attribute(prompts[0], layers=layers)
