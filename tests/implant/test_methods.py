"""The method registry: every registered method runs, exports and reloads; a new method
needs only its module (README "Adding a method")."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from loki_exp.config_fields import spec
from loki_exp.errors import LokiError
from loki_exp.implant import methods
from loki_exp.implant.methods import Method, MethodSettings
from loki_exp.model_access import down_projs
from loki_exp.models import load_model
from loki_exp.pipeline import run
from tests.support.tolerances import assert_close_fp32

STAGES = "stages=[analyse,select,implant,export]"


def _run(compose_cfg, tmp_path, *overrides):
    corda = ["method.covariance.samples=4"] if "method=corda" in overrides else []
    cfg = compose_cfg("model=tiny_llama", "kva.limit=2", "trainer.max_steps=2",
                      "trainer.batch_size=2", "trainer.precision=32-true", "quota=10", *corda,
                      STAGES, f"paths.cache_dir={tmp_path / 'cache'}",
                      f"paths.output_dir={tmp_path / 'run'}", *overrides)
    return cfg, run(cfg, tmp_path / "run")


def _changed(base: torch.nn.Module, model: torch.nn.Module) -> set[str]:
    new = dict(model.named_parameters())
    return {name for name, p in base.named_parameters() if not torch.equal(p, new[name])}


@pytest.mark.parametrize("name", list(methods.REGISTRY))
def test_every_registered_method_runs_two_steps_exports_and_reloads(compose_cfg, tmp_path,
                                                                    isolated_cache, name):
    cfg, state = _run(compose_cfg, tmp_path, f"method={name}")
    method = methods.get(name)
    base = load_model(cfg.model).model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    changed = _changed(base, reloaded)
    downs = {n for n, _ in base.named_parameters() if "down_proj" in n}
    if method.selects_rows:  # only the selected rows of down_proj changed, each of them
        assert changed == downs
        positions = state.positions
        for layer, (b, r) in enumerate(zip(down_projs(base), down_projs(reloaded))):
            moved = (b.weight != r.weight).any(dim=1).nonzero().flatten().tolist()
            assert moved == sorted(positions[layer])
        assert (tmp_path / "run" / "adapter").is_dir() == method.rows_adapter
    elif name == "full":
        assert changed == {n for n, _ in base.named_parameters()}
    else:  # peft adapters on every linear layer, merged: their weights moved, nothing else
        linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)
                  and n != "lm_head"}
        assert changed == {f"{n}.weight" for n in linear}
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():  # the reloaded export is the model the run ended with
        torch.testing.assert_close(reloaded(ids).logits, state.loaded.model(ids).logits)


@pytest.mark.slow  # 7 methods prepared on a tiny model: ~10 s that the fast loop cannot spare
@pytest.mark.parametrize("name", [n for n, m in methods.REGISTRY.items() if m.starts_at_base])
def test_a_method_that_starts_at_base_keeps_the_base_function(compose_cfg, tmp_path,
                                                               isolated_cache, name):
    """What ``Method.starts_at_base`` promises, and a curve's step-0 point relies on: the
    prepared model's logits are the base's (up to the rounding of a residual plus factors)."""
    cfg = compose_cfg("model=tiny_llama", f"method={name}", "method.covariance.samples=4"
                      if name == "corda" else "quota=10", f"paths.cache_dir={tmp_path}")
    loaded = load_model(cfg.model)
    grid = [list(range(0, 64, 7))] * len(down_projs(loaded.model))
    ids = torch.tensor([[1, 5, 9, 14, 3, 8]])
    with torch.no_grad():
        before = loaded.model(ids).logits
        model = methods.prepare(cfg.method, loaded.model, grid, loaded=loaded,
                                cache_dir=cfg.paths.cache_dir)
        after = model(ids).logits
    # Two fp32 paths to one function (a residual plus factors, rows split off): the
    # cross-path budget derived in tests/support/tolerances.py.
    assert_close_fp32(after, before, f"{name} prepared")


@dataclass
class NormOnlySettings(MethodSettings):
    scale: float = spec(1.0, gt=0.0)


def _norm_only(cfg, model, positions, context):
    model.requires_grad_(False)
    model.get_decoder().norm.weight.requires_grad_(True)
    return model


NORM_ONLY = Method("norm_only", NormOnlySettings, _norm_only, lambda m: m, "the final norm only")


@pytest.fixture
def norm_only():
    yield methods.register(NORM_ONLY)
    methods.REGISTRY.pop("norm_only")


def test_a_registered_method_is_checked_run_and_exported(compose_cfg, tmp_path, isolated_cache,
                                                         norm_only):
    cfg, _ = _run(compose_cfg, tmp_path, "method=full", "method.name=norm_only",
                  "+method.scale=2.0")
    base = load_model(cfg.model).model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert _changed(base, reloaded) == {"model.norm.weight"}
    assert not (tmp_path / "run" / "positions.json").exists()  # it selects no rows: no KVA
    with pytest.raises(LokiError, match=r"^method.scale=-1 must be a positive number"):
        _run(compose_cfg, tmp_path / "bad", "method=full", "method.name=norm_only",
             "+method.scale=-1.0")
    with pytest.raises(LokiError, match="already registered"):
        methods.register(norm_only)


def test_an_unknown_method_names_the_registered_ones(compose_cfg):
    with pytest.raises(LokiError, match=r"method.name='nope'.*'loki', 'loki_lora'"):
        methods.get("nope")


def test_an_installed_package_s_method_is_registered_through_its_entry_point():
    from importlib.metadata import EntryPoint

    group = methods.ENTRY_POINT_GROUP
    point = EntryPoint("norm_only", "tests.implant.test_methods:NORM_ONLY", group)
    try:
        assert methods.load_plugins([point]) == ["norm_only"]
        assert methods.get("norm_only") is NORM_ONLY and "norm_only" in methods.METHOD_NAMES
        assert methods.load_plugins([point]) == ["norm_only"]  # loading twice is harmless
    finally:
        methods.REGISTRY.pop("norm_only", None)
    wrong = EntryPoint("bad", "tests.implant.test_methods:NormOnlySettings", group)
    with pytest.raises(LokiError, match=r"^entry point bad = .* is a type; expected a loki_exp Method"):
        methods.load_plugins([wrong])
