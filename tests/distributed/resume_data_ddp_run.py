"""Uninterrupted, stopped and resumed paced runs on 2 CPU processes (DDP, gloo), recording the
problems of every training batch.

Usage: python resume_data_ddp_run.py OUT_DIR STOP_AT TOTAL. For each ``apply_weights`` mode it
trains TOTAL steps, then STOP_AT steps (checkpointing every step), then resumes that run from
its step-STOP_AT checkpoint to TOTAL steps; each rank writes OUT_DIR/<mode>_<run>_rank<r>.json
with the (epoch, batch index, problem indices, loss weights) of every batch it trained on. Run
as its own process: DDP re-executes this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest helpers

from conftest import tiny_paced_datamodule
from resume_runs import ddp_fit, full_first_resumed

from lrkd.callbacks.pacing import PassRatePacing
from lrkd.distributed import close_process_group


class Record(Callback):
    def __init__(self) -> None:
        self.seen: list[list] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append([trainer.current_epoch, batch_idx, batch["problem_index"].tolist(),
                          [round(w, 6) for w in batch["weight"].tolist()]])  # fmt: skip


def fit(out: Path, teacher_dir: Path, mode: str, run: str, max_steps: int,
        ckpt: Path | None) -> None:  # fmt: skip
    # 31 examples an epoch: 16 per rank (one padded), 4 batches of 4; re-estimated every 2
    # steps, so the weights change in the middle of every epoch.
    datamodule = tiny_paced_datamodule(
        teacher_dir, out / "cache", apply_weights=mode, samples_per_epoch=31, batch_size=4,
        estimate_every_n_steps=2, estimate_every_n_epochs=None, rollout_max_new_tokens=3,
        teacher_max_new_tokens=5,
    )  # fmt: skip
    ddp_fit(out, teacher_dir, mode, run, max_steps, ckpt, datamodule, Record(), PassRatePacing())


def main(out_dir: str, stop_at: int, total: int) -> None:
    out = Path(out_dir)
    full_first_resumed(out, ("sampling", "loss_weight"), fit, stop_at, total)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    close_process_group()
