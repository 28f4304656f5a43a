"""TwoStageKL under DDP and FSDP2 (2 CPU processes), with pass-rate estimation and on-policy
rollouts: every rank switches at the configured step, and a run stopped before the switch and
resumed from its checkpoint follows the uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("two_stage_ddp_run.py")


def _run(
    out: Path, name: str, max_steps: int, setup: tuple[str, str], ckpt: Path | None = None
) -> list[dict]:
    args = [sys.executable, str(SCRIPT), str(out), name, str(max_steps), *setup]
    proc = subprocess.run(
        args + ([str(ckpt)] if ckpt else []), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(2)]


def _stages(rank: dict) -> list[tuple[int, float, str, float]]:
    return [(s["step"], s["stage"], s["divergence"], s["on_policy"]) for s in rank["steps"]]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "setup", [("ddp", "plain"), ("fsdp2", "plain"), ("fsdp2", "lrc")], ids="-".join
)
def test_two_stage_switch_and_resume(tmp_path, setup: tuple[str, str]) -> None:
    full = _run(tmp_path, "full", 7, setup)
    expected = [(s, 1.0, "forward_kl", 0.0) for s in range(4)] + [
        (s, 2.0, "reverse_kl", 1.0) for s in range(4, 7)
    ]
    for rank in full:
        assert _stages(rank) == expected
        assert all(s["weighted"] for s in rank["steps"])  # PACED weights on every batch
        assert rank["lr"] == pytest.approx(0.5e-3)
    assert full[0]["student_checksum"] == full[1]["student_checksum"]  # ranks in sync

    _run(tmp_path, "first", 2, setup)
    resumed = _run(tmp_path, "resumed", 7, setup, tmp_path / "first" / "ckpt" / "step=2.ckpt")
    for rank in resumed:
        assert _stages(rank) == expected[2:]
        assert rank["lr"] == pytest.approx(0.5e-3)
    assert resumed[0]["student_checksum"] == resumed[1]["student_checksum"]
