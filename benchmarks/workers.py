"""Fresh-process measurements: run a benchmark script's worker in a new interpreter and read
back the one JSON line it prints after a marker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def run_worker(script: Path, argv: Sequence[str], marker: str, kind: str) -> dict[str, Any]:
    """Runs ``script argv`` in a new interpreter and returns the JSON after ``marker`` on its
    last such stdout line, or ``{"kind", "error", "stderr"}`` when there is none (the error
    names the exit status and the last stderr line)."""
    proc = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, check=False
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line.removeprefix(marker))
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"kind": kind, "error": f"exit {proc.returncode}: {tail}", "stderr": proc.stderr[-4000:]}
