"""Run pass-rate estimation inside a Lightning fit on 1 or 2 CPU processes (DDP, gloo).

Usage: python pacing_ddp_run.py OUT_DIR DEVICES. Each rank writes OUT_DIR/rank<r>.json with the
correct counts of every estimation round. Run as its own process: DDP re-executes this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest helpers

from conftest import save_tiny_teacher, tiny_paced_datamodule

from lrkd.callbacks.pacing import PassRatePacing
from lrkd.data.datamodule import DistillDataModule
from lrkd.distributed import close_process_group
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule


class Record(Callback):
    def __init__(self, datamodule: DistillDataModule) -> None:
        self.datamodule = datamodule
        self.rounds: list[list[int]] = []
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.datamodule.rounds > self._seen:
            self._seen = self.datamodule.rounds
            self.rounds.append(self.datamodule.correct.tolist())


def main(out_dir: str, devices: int) -> None:
    out = Path(out_dir)
    teacher_dir = save_tiny_teacher(out / "teacher")  # once, before DDP starts
    datamodule = tiny_paced_datamodule(
        teacher_dir, out / f"cache{devices}", num_problems=30, val_fraction=0.2, num_rollouts=6,
        rollout_max_new_tokens=3, teacher_max_new_tokens=5, rollout_batch_size=8,
        estimate_every_n_steps=2, estimate_every_n_epochs=None, batch_size=2, seq_length=40,
    )  # fmt: skip
    module = DistillationModule(
        teacher=str(teacher_dir),
        student=FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0),
        teacher_dtype="float32",
    )
    record = Record(datamodule)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record, PassRatePacing()],
    )
    trainer.fit(module, datamodule=datamodule)
    result = {
        "rounds": record.rounds,
        "teacher_responses": [
            datamodule.examples("train")[i]["input_ids"].tolist()
            for i in range(len(datamodule.examples("train")))
        ],
        "student_checksum": float(sum(p.double().sum() for p in module.student.parameters())),
    }
    (out / f"devices{devices}_rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]))
    close_process_group()
