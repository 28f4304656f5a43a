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

from conftest import make_tiny_llama, make_tokenizer

from lrkd.callbacks.lm_eval import LMEvalCallback
from lrkd.data.text import TextDataModule
from lrkd.distributed import FSDP2Strategy, close_process_group
from lrkd.models.lowrank import LowRankCloneBuilder
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule


def main(out_dir: str, strategy: str, student: str) -> None:
    out = Path(out_dir)
    teacher_dir = out / "teacher"
    if not (teacher_dir / "config.json").exists():  # written once, before DDP starts
        make_tiny_llama(seed=0).save_pretrained(teacher_dir)
        make_tokenizer().save_pretrained(teacher_dir)
    seed_everything(0)
    module = DistillationModule(
        teacher=str(teacher_dir),
        student=LowRankCloneBuilder(hidden_size=32, init_std=0.1)
        if student == "lrc"
        else FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0),
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
