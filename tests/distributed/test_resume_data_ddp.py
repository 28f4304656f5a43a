"""Under DDP (2 CPU processes), a run resumed from a mid-epoch checkpoint trains every rank on
exactly the batches that rank trained on at those steps in the uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("resume_data_ddp_run.py")


@pytest.mark.distributed
def test_resumed_ddp_run_trains_on_the_uninterrupted_batches(tmp_path) -> None:
    """Stopped after 3 of an epoch's 4 steps (the weights re-estimated at step 2, after the
    epoch's examples were drawn) and resumed: the last batch of that epoch and the next epoch's
    batches are the uninterrupted run's on every rank, in both ``apply_weights`` modes."""
    stop_at, total = 3, 7
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(stop_at), str(total)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def seen(mode: str, run: str, rank: int) -> list:
        return json.loads((tmp_path / f"{mode}_{run}_rank{rank}.json").read_text())

    for mode in ("sampling", "loss_weight"):
        full = [seen(mode, "full", r) for r in range(2)]
        assert full[0] != full[1]  # the ranks train on different examples
        for rank in range(2):
            assert len(full[rank]) == total
            assert seen(mode, "resumed", rank) == full[rank][stop_at:], (mode, rank)
