"""Text data under DDP (2 CPU processes): raw files are prepared once, each rank reads its share
of the memory-mapped blocks (every block once an epoch, across the ranks), and a run resumed
from a mid-epoch checkpoint trains every rank on exactly the uninterrupted run's batches, from a
prepared directory and from a stream alike."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("resume_text_ddp_run.py")


@pytest.mark.distributed
def test_text_ddp_reads_each_block_once_and_resumes_exactly(tmp_path) -> None:
    stop_at, total = 3, 12
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(stop_at), str(total)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Prepared once, by one process, on the first run; the later runs use the cache.
    assert proc.stderr.count("lrkd prepare: wrote") == 1, proc.stderr[-3000:]

    def seen(mode: str, run: str, rank: int) -> list:
        return json.loads((tmp_path / f"{mode}_{run}_rank{rank}.json").read_text())

    for mode in ("prepared", "streaming"):
        full = [seen(mode, "full", r) for r in range(2)]
        assert full[0] != full[1], mode  # the ranks train on different blocks
        for rank in range(2):
            assert len(full[rank]) == total
            assert seen(mode, "resumed", rank) == full[rank][stop_at:], (mode, rank)

    from lrkd.data.prepared import PreparedExamples

    (prepared,) = (tmp_path / "cache").iterdir()
    blocks = PreparedExamples(prepared / "train")
    every = Counter(tuple(blocks[i]["input_ids"].tolist()) for i in range(len(blocks)))
    full = [seen("prepared", "full", r) for r in range(2)]
    epoch0 = Counter(tuple(row) for rank in full for epoch, rows in rank if epoch == 0
                     for row in rows)  # fmt: skip
    # Every block exactly once; DistributedSampler pads an odd count with one repeat.
    padding = len(blocks) % 2
    assert set(epoch0) == set(every)
    assert sum(epoch0.values()) == len(blocks) + padding
    assert sum((epoch0 - every).values()) == padding
    assert any(epoch == 1 for rank in full for epoch, _ in rank), "the runs reach epoch 1"
