"""The built-in teacher on lrkd_arithmetic, three ways (benchmarks/eval_parity.py): ``lrkd
eval``, LMEvalCallback and lrkd's own greedy pass@1 give the same score on the same items."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_parity.py"


def test_cli_callback_and_lrkd_pass_at_1_agree_on_the_real_teacher(tmp_path: Path) -> None:
    out = tmp_path / "parity.json"
    cmd = [sys.executable, str(SCRIPT), "--limit", "20", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["items"] == 20
    assert result["lrkd_eval"] == result["callback"] == result["lrkd_pass_at_1"]
    assert result["items_that_differ"] == 0
    # A 135M instruct model solves some, not all, of the first 20 (mostly easy) problems.
    assert 0.0 < result["lrkd_eval"] < 1.0
    assert result["callback_seconds_per_call"] > 0
    assert "| lrkd pass@1 |" in proc.stdout
