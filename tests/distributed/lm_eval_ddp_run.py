"""LMEvalCallback on 2 CPU processes (gloo): rank 0 evaluates, the other waits.

Usage: python lm_eval_ddp_run.py OUT_DIR STRATEGY STUDENT, STRATEGY ``ddp`` or ``fsdp2``, STUDENT
``plain`` or ``lrc``. Trains the tiny teacher's student for 3 steps with LMEvalCallback at step
0 (with the teacher), step 2 and the end; each rank writes OUT_DIR/rank<r>.json with the
callback's history and a checksum of the student. Run as its own process: the strategy
re-executes this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest helpers

from conftest import save_tiny_teacher, tiny_student

from lrkd.callbacks.lm_eval import LMEvalCallback
from lrkd.data.text import TextDataModule
from lrkd.distributed import FSDP2Strategy, close_process_group
from lrkd.module import DistillationModule


def main(out_dir: str, strategy: str, student: str) -> None:
    out = Path(out_dir)
    teacher_dir = save_tiny_teacher(out / "teacher")  # once, before DDP starts
    seed_everything(0)
    module = DistillationModule(
        teacher=str(teacher_dir),
        student=tiny_student(student),
        teacher_dtype="float32",
    )
    callback = LMEvalCallback(
        tasks=["lrkd_corpus"], limit=3, every_n_steps=2, at_fit_start=True, teacher=True
    )
    data = TextDataModule(tokenizer=str(teacher_dir), seq_length=32, batch_size=2,
                          builtin_documents=60)  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy() if strategy == "fsdp2" else "ddp",
        max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    checksum = sum(
        float((p.full_tensor() if isinstance(p, DTensor) else p).double().sum())
        for p in module.student.parameters()
    )
    result = {"history": callback.history, "student_checksum": checksum}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])
    close_process_group()
