"""benchmarks/vs_trl.py: TRL's GKDTrainer, a bare loop and lrkd on one tiny job, each in its own
process. The three compute the same forward KL on the same models and batch, so their first
losses (before any update) agree; needs ``trl`` (``pip install -e '.[bench]'``, as .ci/run
does)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_trl.py"


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "vs_trl.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--rounds", "1", "--warmup", "1", "--steps",
           "1", "--json", str(out), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_three_steps_agree_and_are_measured(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="trl is not installed: pip install -e '.[bench]'")
    proc, result = _run(tmp_path, "--precision", "32-true", "--lrkd-precision", "32-true")
    summary = result["summary"]
    assert set(summary) == {"trl", "bare", "lrkd"}
    first = {kind: s["first_loss"] for kind, s in summary.items()}
    assert first["bare"] > 0.01  # random student vs random teacher: apart
    for kind in ("trl", "lrkd"):  # forward KL, mean over the 8 x 127 target tokens
        assert math.isclose(first[kind], first["bare"], rel_tol=1e-4), first
    for s in summary.values():
        assert s["tokens_per_s"] > 0 and s["ms_per_step"] > 0
        assert s["peak_rss_bytes"] > s["rss_growth_bytes"] > 0
        assert 0 < s["mfu"] < 1.5, s  # a tiny model is far from the ceiling, not above it
        assert s["precision"] == "32-true" and s["teacher_dtype"] == "float32"
    rows = [r for r in result["rows"] if "error" not in r]
    assert len(rows) == 3 and all(len(r["losses"]) == 2 for r in rows)
    assert "| TRL GKDTrainer (lmbda 0, beta 0) | 32-true (float32) |" in proc.stdout
    assert "vs TRL speed" in proc.stdout


def test_lrkd_follows_the_forced_cpu_probe(tmp_path: Path, monkeypatch) -> None:
    """lrkd at its default precision: the probe's decision, here forced to bf16 (AMX-like)."""
    monkeypatch.setenv("LRKD_CPU_BF16_SPEEDUP", "8")
    proc, result = _run(tmp_path, "--kinds", "bare", "lrkd")
    summary = result["summary"]
    assert summary["lrkd"]["precision"] == "bf16-mixed"
    assert summary["lrkd"]["teacher_dtype"] == "bfloat16"
    assert summary["bare"]["precision"] == "bf16-mixed"  # auto: each tool at the probe's best
    assert math.isclose(
        summary["lrkd"]["first_loss"], summary["bare"]["first_loss"], rel_tol=2e-2
    )  # bf16 autocast in both, rounding apart
    assert "bf16 matmul 8.00x fp32 ($LRKD_CPU_BF16_SPEEDUP)" in proc.stdout
