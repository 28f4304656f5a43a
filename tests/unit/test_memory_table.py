"""benchmarks/memory_table.py: its LRC parameter formula and the materialised size agree with
the real LowRankClone (the script asserts both before printing), and the 3B table's counts are
the published Llama-3.2-3B size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_table.py"


def test_memory_table_counts() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| teacher (frozen) | 3,212,749,824" in out  # Llama-3.2-3B, tied embeddings
    # 28 x 7 x 3072 x 1536 layer projections + 3072 x 1536 embedding + (2 x 28 + 1) x 1536 norms
    assert "| LRC trainable | 929,650,176" in out
    assert "= formula" in out and "= meta count" in out
    assert "| FSDP2 full shard, persistent only (/ N) | 19.84 | 9.92 | 4.96 | 2.48 |" in out
