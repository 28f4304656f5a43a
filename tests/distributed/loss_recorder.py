"""A callback for subprocess runs: rank zero appends each training step's loss (averaged over
ranks) to a JSON-lines file."""

from __future__ import annotations

import json
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
