"""A LoKI run's adapter (its trained rows) applied to the base equals the run's own export."""

import json

import pytest

from loki_exp.apply import apply_adapter
from loki_exp.errors import LokiError
from loki_exp.models import load_model
from loki_exp.pipeline import run


def _base(compose_cfg, tmp_path, name="tiny_llama"):
    """A tiny random model saved as a plain checkpoint: the base a run loads from disk."""
    loaded = load_model(compose_cfg(f"model={name}").model)
    path = tmp_path / f"base_{name}"
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def _loki_run(compose_cfg, tmp_path, base, method):
    out = tmp_path / f"run_{method}"
    cfg = compose_cfg("model=llama", f"model.name_or_path={base}", "model.dtype=float32",
                      f"method={method}", "quota=30", "kva.limit=2", "kva.dtype=float32",
                      "trainer.max_steps=2", "trainer.batch_size=2", "trainer.precision=32-true",
                      "stages=[analyse,select,implant,export]", f"paths.cache_dir={tmp_path / 'c'}",
                      f"paths.output_dir={out}")
    run(cfg, out)
    return out


@pytest.mark.parametrize("method", ["loki", "loki_lora"])
def test_adapter_applied_to_its_base_is_the_export_bit_for_bit(compose_cfg, tmp_path, method,
                                                              capsys):
    base = _base(compose_cfg, tmp_path)
    out = _loki_run(compose_cfg, tmp_path, base, method)
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert (meta["method"], meta["quota"], meta["strategy"], meta["kva_preset"]) == (
        method, 30, "layer_balanced", "published")
    assert '"quota": 30,' in (out / "adapter" / "adapter.json").read_text()  # as run.json has it
    assert meta["trained_rows"] == 3 * 19 and meta["layers"] == 3
    applied = apply_adapter(base, out / "adapter", tmp_path / "applied")
    assert (applied / "model.safetensors").read_bytes() == (
        out / "model" / "model.safetensors").read_bytes()
    assert json.loads((out / "run.json").read_text())["adapter_dir"] == str(out / "adapter")
    if method == "loki":
        _refusals(compose_cfg, tmp_path, out / "adapter", capsys)


def _refusals(compose_cfg, tmp_path, adapter, capsys):
    """One line and nothing written: another base (unless --force), a folder that is not an
    adapter, rows whose shapes do not fit the base."""
    from safetensors.torch import load_file, save_file

    other = _base(compose_cfg, tmp_path / "other")
    weights = load_file(str(other / "model.safetensors"))
    next(iter(weights.values())).view(-1)[0] += 1.0  # one weight: another base
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    from loki_exp.apply import main as apply_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:  # the command line, in this process
        apply_cli([str(other), str(adapter), str(tmp_path / "refused")])
    stderr = capsys.readouterr().err
    assert ended.value.code == 2 and "is not this adapter's base" in stderr
    assert "--force" in stderr and not (tmp_path / "refused").exists()
    forced = apply_adapter(other, adapter, tmp_path / "forced", force=True)
    assert (forced / "model.safetensors").exists()
    with pytest.raises(LokiError, match="is not a loki_exp adapter: expected adapter.json"):
        apply_adapter(other, tmp_path, tmp_path / "out")
    qwen = _base(compose_cfg, tmp_path, "tiny_qwen")  # 80-wide down_proj inputs, not 96
    with pytest.raises(LokiError, match=r"layer 0 rows have shape \(19, 96\), the base model's "
                                        r"down_proj needs \(19, 80\)"):
        apply_adapter(qwen, adapter, tmp_path / "out", force=True)
    assert not (tmp_path / "out").exists()
