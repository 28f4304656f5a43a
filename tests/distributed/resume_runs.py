"""What the resumed-run DDP scripts share: a 2-process CPU Trainer that checkpoints every step,
the three runs (uninterrupted, stopped, resumed) per data mode, and each rank's record.

Each script gives a ``fit(out, teacher_dir, mode, run, max_steps, ckpt)`` that builds its
DataModule and module and calls :func:`ddp_fit`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from conftest import save_tiny_teacher
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule


def ddp_fit(
    out: Path, teacher_dir: Path, mode: str, run: str, max_steps: int, ckpt: Path | None,
    datamodule: Any, record: Callback, *callbacks: Callback,
) -> None:  # fmt: skip
    """Train a tiny student on 2 CPU processes (DDP), checkpointing every step into
    ``out/<mode>_<run>_ckpt``; each rank writes ``record.seen`` to
    ``out/<mode>_<run>_rank<r>.json``."""
    module = DistillationModule(
        teacher=str(teacher_dir), teacher_dtype="float32",
        student=FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0),
    )  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[record, *callbacks,
                   ModelCheckpoint(dirpath=out / f"{mode}_{run}_ckpt", save_top_k=-1,
                                   every_n_train_steps=1, filename="{step}")],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    path = out / f"{mode}_{run}_rank{trainer.global_rank}.json"
    path.write_text(json.dumps(record.seen))


def full_first_resumed(
    out: Path, modes: Iterable[str], fit: Callable[..., None], stop_at: int, total: int
) -> None:
    """For each mode: TOTAL steps, then STOP_AT steps, then the stopped run resumed from its
    step-STOP_AT checkpoint to TOTAL steps (the tiny teacher written once, before DDP starts)."""
    teacher_dir = save_tiny_teacher(out / "teacher")
    for mode in modes:
        fit(out, teacher_dir, mode, "full", total, None)
        fit(out, teacher_dir, mode, "first", stop_at, None)
        fit(out, teacher_dir, mode, "resumed", total,
            out / f"{mode}_first_ckpt" / f"step={stop_at}.ckpt")  # fmt: skip
