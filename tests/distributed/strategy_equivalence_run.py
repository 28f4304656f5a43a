"""Train the tiny teacher's student for a few steps on 1 process, or on 2 (gloo) under DDP or
FSDP2, on the same global batches, and write the loss of every step, the final student weights
and how many teacher and student parameter elements each rank holds.

Usage: python strategy_equivalence_run.py OUT_DIR DEVICES STUDENT (plain | lrc) STRATEGY
(ddp | fsdp2) [PRECISION (32-true | bf16-mixed | bf16-true)]. Every row has the same number
of target tokens, so the mean of the two ranks' per-token losses is the one-process loss of the
whole batch. Run as its own process: the strategies re-execute this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest helpers

from conftest import make_tiny_llama

from lrkd.distributed import FSDP2Strategy, close_process_group, local_numel
from lrkd.models.lowrank import LowRankCloneBuilder
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule
from lrkd.objective import Loss

GLOBAL_BATCH, STEPS, LENGTH, PROMPT = 4, 4, 12, 4


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        self.losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))


def examples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(GLOBAL_BATCH * STEPS):
        ids = torch.randint(4, 120, (LENGTH,), generator=g)
        loss_mask = torch.zeros_like(ids)
        loss_mask[PROMPT:] = 1
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
        )
    return rows


class Examples(LightningDataModule):
    """Rank r of n takes examples r, r + n, ...: the ranks' batches of step s together are the
    one-process batch of step s."""

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(examples(), num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(examples(), batch_size=GLOBAL_BATCH // world, sampler=sampler)


def main(
    out_dir: str, devices: int, student_kind: str, strategy: str, precision: str = "32-true"
) -> None:
    seed_everything(0)
    if student_kind == "lrc":
        student = LowRankCloneBuilder(hidden_size=32, init="normal", clone_loss="mse")
    else:
        student = FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0)
    module = DistillationModule(
        make_tiny_llama(seed=0),
        student,
        teacher_dtype="float32",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        activation_checkpointing=strategy == "fsdp2",  # composes with FSDP2; exact recompute
        # The fused head+divergence path under FSDP2 for the clone (the logits path elsewhere).
        fused_head=strategy == "fsdp2" and student_kind == "lrc",
        loss=Loss(clone_weight=0.5 if student_kind == "lrc" else 0.0),
    )
    record = Losses()
    strategies = {"fsdp2": FSDP2Strategy(), "ddp": "ddp" if devices > 1 else "auto"}
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy=strategies[strategy], precision=precision,
        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record], use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=Examples())
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v
             for k, v in module.student.state_dict().items()}  # fmt: skip
    result = {
        "losses": record.losses,
        "student": {k: v.tolist() for k, v in state.items()},
        "teacher_numel": local_numel(module.teacher),
        "teacher_numel_full": sum(p.numel() for p in module.teacher.parameters()),
        "student_trainable_numel": local_numel(module.student, trainable=True),
        "teacher_requires_grad": any(p.requires_grad for p in module.teacher.parameters()),
        "teacher_training": any(m.training for m in module.teacher.modules()),
        "optimizer_numel": sum(local_numel(torch.nn.ParameterList(g["params"]))
                               for g in trainer.optimizers[0].param_groups
                               ),
    }  # fmt: skip
    name = f"{student_kind}_{strategy}_{precision}_devices{devices}_rank{trainer.global_rank}.json"
    (Path(out_dir) / name).write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
    close_process_group()
