"""The CPU bf16 probe behind ``auto`` precision and teacher dtype (lrkd.hardware)."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch

from lrkd import hardware
from lrkd.models.teachers import frozen_teacher


@pytest.mark.parametrize(
    ("speedup", "bf16"), [(8.0, True), (2.0, True), (1.9, False), (0.1, False)]
)
def test_forced_probe_decides_precision_and_teacher_dtype(cpu_bf16, speedup, bf16) -> None:
    cpu_bf16(speedup)
    assert hardware.prefers_bf16() is bf16
    assert hardware.auto_precision() == ("bf16-mixed" if bf16 else "32-true")
    assert hardware.auto_teacher_dtype() == (torch.bfloat16 if bf16 else torch.float32)


@pytest.mark.parametrize("speedup", [8.0, 0.1])
def test_auto_teacher_follows_the_probe_and_explicit_dtype_wins(
    cpu_bf16, tiny_teacher_dir, speedup
) -> None:
    cpu_bf16(speedup)
    auto, _ = frozen_teacher(str(tiny_teacher_dir), "auto")
    expected = torch.bfloat16 if speedup > 1 else torch.float32
    assert {p.dtype for p in auto.parameters()} == {expected}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        explicit, _ = frozen_teacher(str(tiny_teacher_dir), name)
        assert {p.dtype for p in explicit.parameters()} == {dtype}


def test_cuda_bf16_wins_over_a_slow_cpu(cpu_bf16, monkeypatch) -> None:
    cpu_bf16(0.1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.auto_precision() == "bf16-mixed"


def test_measured_probe_is_quick_logged_once_and_exported(cpu_bf16, monkeypatch, caplog) -> None:
    cpu_bf16(1.0)  # clears the cache and patches CUDA away ...
    monkeypatch.delenv(hardware.PROBE_ENV)  # ... and now nothing is forced: it measures
    caplog.set_level(logging.INFO, logger="lrkd")
    start = time.perf_counter()
    first = hardware.cpu_bf16_probe()
    elapsed = time.perf_counter() - start
    assert hardware.cpu_bf16_probe() is first  # once per process
    assert elapsed < 1.0
    assert first.source == "measured"
    assert first.fp32_gflops > 0 and first.bf16_gflops > 0
    assert math.isclose(first.speedup, first.bf16_gflops / first.fp32_gflops, rel_tol=1e-9)
    lines = [r.getMessage() for r in caplog.records if "CPU bf16 matmul" in r.getMessage()]
    assert len(lines) == 1
    assert f"{first.speedup:.2f}x fp32" in lines[0]
    choice = "bf16-mixed" if first.prefers_bf16 else "fp32"
    assert f"auto picks {choice}" in lines[0]
    # Child processes (DDP workers) inherit the ratio instead of measuring again.
    assert float(hardware.os.environ[hardware.PROBE_ENV]) == pytest.approx(first.speedup, 1e-3)


def test_probe_agrees_with_the_cpu_flags(cpu_bf16, monkeypatch) -> None:
    """No matrix extension with bf16 (AVX512-BF16 or AMX): bf16 is not faster here."""
    cpu_bf16(1.0)
    monkeypatch.delenv(hardware.PROBE_ENV)
    from lrkd.env import cpu_flags

    flags = cpu_flags()
    probe = hardware.cpu_bf16_probe()
    if not ({"avx512_bf16", "amx_bf16"} & set(flags)):
        assert not probe.prefers_bf16, probe.describe()
    elif "amx_bf16" in flags:
        assert probe.prefers_bf16, probe.describe()
    else:
        assert probe.speedup > 0  # AVX512-BF16 without AMX: either answer is plausible


@pytest.mark.parametrize("value", ["fast", "-1", "nan"])
def test_bad_forced_value_names_the_variable(cpu_bf16, monkeypatch, value) -> None:
    cpu_bf16(1.0)
    monkeypatch.setenv(hardware.PROBE_ENV, value)
    with pytest.raises(ValueError, match=hardware.PROBE_ENV):
        hardware.cpu_bf16_probe()
