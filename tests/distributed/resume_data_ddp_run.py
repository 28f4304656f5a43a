"""Uninterrupted, stopped and resumed paced runs on 2 CPU processes (DDP, gloo), recording the
problems of every training batch.

Usage: python resume_data_ddp_run.py OUT_DIR STOP_AT TOTAL. For each ``apply_weights`` mode it
trains TOTAL steps, then STOP_AT steps (checkpointing every step), then resumes that run from
its step-STOP_AT checkpoint to TOTAL steps; each rank writes OUT_DIR/<mode>_<run>_rank<r>.json
with the (epoch, batch index, problem indices, loss weights) of every batch it trained on. Run
as its own process: DDP re-executes this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest helpers

from conftest import make_tiny_llama, make_tokenizer, tiny_paced_datamodule

from lrkd.callbacks.pacing import PassRatePacing
from lrkd.distributed import close_process_group
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule


class Record(Callback):
    def __init__(self) -> None:
        self.seen: list[list] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append([trainer.current_epoch, batch_idx, batch["problem_index"].tolist(),
                          [round(w, 6) for w in batch["weight"].tolist()]])  # fmt: skip


def fit(out: Path, teacher_dir: Path, mode: str, run: str, max_steps: int,
        ckpt: Path | None = None) -> None:  # fmt: skip
    # 31 examples an epoch: 16 per rank (one padded), 4 batches of 4; re-estimated every 2
    # steps, so the weights change in the middle of every epoch.
    datamodule = tiny_paced_datamodule(
        teacher_dir, out / "cache", apply_weights=mode, samples_per_epoch=31, batch_size=4,
        estimate_every_n_steps=2, estimate_every_n_epochs=None, rollout_max_new_tokens=3,
        teacher_max_new_tokens=5,
    )  # fmt: skip
    module = DistillationModule(
        teacher=str(teacher_dir), teacher_dtype="float32",
        student=FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0),
    )  # fmt: skip
    record = Record()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[record, PassRatePacing(),
                   ModelCheckpoint(dirpath=out / f"{mode}_{run}_ckpt", save_top_k=-1,
                                   every_n_train_steps=1, filename="{step}")],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    path = out / f"{mode}_{run}_rank{trainer.global_rank}.json"
    path.write_text(json.dumps(record.seen))


def main(out_dir: str, stop_at: int, total: int) -> None:
    out = Path(out_dir)
    teacher_dir = out / "teacher"
    if not (teacher_dir / "config.json").exists():  # written once, before DDP starts
        make_tiny_llama(seed=0).save_pretrained(teacher_dir)
        make_tokenizer().save_pretrained(teacher_dir)
    for mode in ("sampling", "loss_weight"):
        fit(out, teacher_dir, mode, "full", total)
        fit(out, teacher_dir, mode, "first", stop_at)
        fit(out, teacher_dir, mode, "resumed", total,
            out / f"{mode}_first_ckpt" / f"step={stop_at}.ckpt")  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    close_process_group()
