"""For `lrkd fit` in a subprocess: a callback with which rank zero appends each training step's
loss (averaged over ranks) to a JSON-lines file, the run itself, and reading the losses back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lightning.pytorch import Callback


class RecordLosses(Callback):
    """Append ``{"step": s, "loss": l}`` per training batch to ``path`` (rank zero).

    Args:
        path: the JSON-lines file.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step - 1, "loss": float(loss)}) + "\n")


def fit_in_subprocess(config: Path, *args: str) -> None:
    """``python -m lrkd.cli fit --config CONFIG ARGS`` with this folder importable (for
    :class:`RecordLosses`); fails the test with the run's output tail unless it succeeds."""
    here = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "lrkd.cli", "fit", "--config", str(config), *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def read_losses(path: Path) -> dict[int, float]:
    """The losses :class:`RecordLosses` wrote, by step."""
    return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines())}
