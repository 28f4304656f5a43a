"""A two-stage (forward then on-policy reverse KL) paced run on 2 CPU processes (gloo).

Usage: python two_stage_ddp_run.py OUT_DIR NAME STOP_AT STRATEGY STUDENT [CKPT], STRATEGY
``ddp`` or ``fsdp2``, STUDENT ``plain`` or ``lrc``. Trains the tiny teacher's student for
MAX_STEPS = 7 steps, interrupted after step STOP_AT (7: never), with TwoStageKL switching at
step 4, checkpointing every step under
OUT_DIR/NAME/ckpt, resuming from CKPT when given; each rank writes OUT_DIR/NAME/rank<r>.json with
the stage, divergence and on-policy flag of every step it trained. Teacher responses, pass-rate
estimates and on-policy rollouts all run under the strategy (under FSDP2 on gathered copies).
Run as its own process: the strategy re-executes this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest helpers

from conftest import save_tiny_teacher, stop_after, tiny_paced_datamodule, tiny_student

from lrkd.callbacks.pacing import PassRatePacing
from lrkd.callbacks.two_stage import TwoStageKL
from lrkd.distributed import FSDP2Strategy, close_process_group
from lrkd.generation.on_policy import OnPolicy
from lrkd.module import DistillationModule

SWITCH_STEP = 4
MAX_STEPS = 7


class Record(Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({
            "step": trainer.global_step - 1,
            "stage": trainer.callback_metrics["train/stage"].item(),
            "divergence": pl_module.objective.divergence.kind,
            "on_policy": trainer.callback_metrics["train/on_policy"].item()
            if "train/on_policy" in trainer.callback_metrics else 0.0,
            "weighted": "weight" in batch,
        })  # fmt: skip


def main(
    out_dir: str, name: str, stop_at: int, strategy: str, student: str, ckpt: str | None
) -> None:
    out = Path(out_dir)
    teacher_dir = save_tiny_teacher(out / "teacher")  # once, before DDP starts
    seed_everything(0)
    datamodule = tiny_paced_datamodule(
        teacher_dir, out / "cache", rollout_max_new_tokens=3, teacher_max_new_tokens=5,
        estimate_every_n_steps=3, estimate_every_n_epochs=None, batch_size=2,
    )  # fmt: skip
    module = DistillationModule(
        teacher=str(teacher_dir),
        student=tiny_student(student),
        teacher_dtype="float32",
        on_policy=OnPolicy(max_new_tokens=4),
    )
    record = Record()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FSDP2Strategy() if strategy == "fsdp2" else "ddp",
        max_steps=MAX_STEPS,
        limit_val_batches=0,
        logger=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            TwoStageKL(switch_step=SWITCH_STEP, second_lr_scale=0.5),
            PassRatePacing(),
            record,
            ModelCheckpoint(dirpath=out / name / "ckpt", every_n_train_steps=1, save_top_k=-1,
                            filename="{step}"),
            stop_after(stop_at),  # an interruption after that step (MAX_STEPS: the whole run)
        ],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    result = {
        "steps": record.steps,
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "student_checksum": float(
            sum(
                (p.full_tensor() if isinstance(p, DTensor) else p).double().sum()
                for p in module.student.parameters()
            )
        ),
    }
    (out / name / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(
        *sys.argv[1:3], int(sys.argv[3]), *sys.argv[4:6], sys.argv[6] if len(sys.argv) > 6 else None
    )
    close_process_group()
