"""LMEvalCallback under DDP and FSDP2 (2 CPU processes): rank 0 scores the student (a low-rank
clone gathered and multiplied out under FSDP2) and, once, the teacher, while the other rank
waits; training then goes on in step on both ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("lm_eval_ddp_run.py")


@pytest.mark.distributed
@pytest.mark.parametrize("setup", [("ddp", "plain"), ("fsdp2", "lrc")], ids="-".join)
def test_rank_zero_evaluates_and_training_goes_on(tmp_path, setup: tuple[str, str]) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), *setup],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    history = ranks[0]["history"]
    assert [row["step"] for row in history] == [0.0, 2.0, 3.0]
    assert "eval/lrkd_corpus/word_perplexity_teacher" in history[0]
    assert not any(k.endswith("_teacher") for row in history[1:] for k in row)
    assert all(row["eval/lrkd_corpus/word_perplexity"] > 1 for row in history)
    assert ranks[1]["history"] == []  # only rank 0 evaluates
    assert ranks[0]["student_checksum"] == ranks[1]["student_checksum"]  # ranks in sync
