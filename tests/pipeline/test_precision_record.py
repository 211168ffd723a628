"""Each stage's precision, and why, in run.json and the run summary."""

from __future__ import annotations

import pytest

from loki_exp import precision_record


@pytest.mark.parametrize("hardware,expected", [
    (True, "bf16-mixed (picked for this CPU: bf16 hardware (AVX512-BF16 or AMX) found)"),
    (False, "32-true (picked for this CPU: no bf16 hardware, so fp32)")])
def test_the_cpu_picked_precision_says_why(compose_cfg, monkeypatch, hardware, expected):
    monkeypatch.setattr(precision_record, "cpu_has_native_bf16", lambda: hardware)
    from loki_exp import resolvers

    monkeypatch.setattr(resolvers, "cpu_has_native_bf16", lambda: hardware)
    cfg = compose_cfg("experiment=cpu_demo")
    record = precision_record.stage_precisions(cfg, "float32", "float32")
    assert record["implant"] == expected and record["cpu_bf16_hardware"] is hardware
    assert record["analyse"].startswith("float32") and record["evaluate"].startswith("float32")
    line = precision_record.precision_line(record)
    assert line.startswith("Precision: analyse float32") and f"implant {expected}" in line
    assert line.endswith("bf16 hardware).") if hardware else line.endswith("(no bf16 hardware).")


def test_a_configured_precision_is_as_configured(compose_cfg):
    cfg = compose_cfg("trainer.precision=32-true", "stages=[implant]")
    record = precision_record.stage_precisions(cfg)
    assert record["implant"] == "32-true (as configured)"
    assert "analyse" not in record and "evaluate" not in record


def test_a_cpu_capped_to_avx2_counts_as_one_without_bf16(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 runs a newer CPU's kernels as an AVX2-only one's: its bf16
    matmuls are emulated there, so the CPU precision is fp32."""
    from loki_exp import resolvers

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolvers.cpu_has_native_bf16() is False
    assert resolvers._cpu_precision() == "32-true"
