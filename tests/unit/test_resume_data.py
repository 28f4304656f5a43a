"""A run resumed from a mid-epoch checkpoint trains on exactly the batches the uninterrupted run
trained on at those steps (same examples, same order), in both ``apply_weights`` modes, with
the pass rates re-estimated mid-epoch, and with gradient accumulation."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_paced_datamodule
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lrkd.callbacks.pacing import PassRatePacing
from lrkd.data.datamodule import PacedSampler
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule

# 24 examples an epoch in batches of 4: 6 batches an epoch; re-estimated every 2 steps, so the
# weights change in the middle of every epoch.
DATA = dict(samples_per_epoch=24, batch_size=4, estimate_every_n_steps=2,
            estimate_every_n_epochs=None)  # fmt: skip


class Batches(Callback):
    """Records (epoch, batch index, problem indices, loss weights) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[int], list[float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, batch["problem_index"].tolist(),
                          [round(w, 6) for w in batch["weight"].tolist()]))  # fmt: skip


def _fit(
    root: Path, teacher_dir: Path, cache: Path, max_steps: int, *, ckpt_path: str | None = None,
    accumulate: int = 1, **data,
) -> tuple[Batches, list[str]]:  # fmt: skip
    dm = tiny_paced_datamodule(teacher_dir, cache, **{**DATA, **data})
    module = DistillationModule(
        teacher=str(teacher_dir), teacher_dtype="float32",
        student=FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0),
    )  # fmt: skip
    batches = Batches()
    trainer = Trainer(
        accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate,
        limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root),
        callbacks=[batches, PassRatePacing(),
                   ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                   filename="{step}")],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return batches, [str(w.message) for w in caught]


@pytest.mark.parametrize("apply_weights", ["sampling", "loss_weight"])
@pytest.mark.parametrize(
    ("stop_at", "accumulate", "workers"), [(3, 1, 0), (8, 1, 0), (6, 1, 0), (2, 2, 0), (3, 1, 1)],
    ids=["epoch0", "epoch1", "end_of_epoch0", "accumulate2", "worker_process"],
)  # fmt: skip
def test_resumed_run_trains_on_the_uninterrupted_batches(
    tmp_path, tiny_teacher_dir, apply_weights: str, stop_at: int, accumulate: int, workers: int
) -> None:
    """Stopped after ``stop_at`` optimizer steps (3 of 6 batches of epoch 0, 2 of epoch 1, at
    the end of epoch 0, 4 micro-batches of epoch 0 with accumulation, or 3 batches loaded by
    a worker process) and resumed from that step's checkpoint: from there on the same problems
    in the same order, with the same weights, through the end of the epoch and into the next
    one."""
    total = 11 if accumulate == 1 else 5  # past the end of the interrupted epoch
    cache = tmp_path / "cache"
    kw = dict(accumulate=accumulate, apply_weights=apply_weights, num_workers=workers)
    full, _ = _fit(tmp_path / "full", tiny_teacher_dir, cache, total, **kw)
    _fit(tmp_path / "first", tiny_teacher_dir, cache, stop_at, **kw)
    ckpt = tmp_path / "first" / "ckpt" / f"step={stop_at}.ckpt"
    resumed, _ = _fit(tmp_path / "resumed", tiny_teacher_dir, cache, total,
                      ckpt_path=str(ckpt), **kw)  # fmt: skip
    consumed = stop_at * accumulate
    assert len(full.seen) == total * accumulate
    assert resumed.seen == full.seen[consumed:]
    # The weights did change mid-epoch (so replaying the epoch's draws with the restored
    # weights would not do): the loss weights or the drawn problems differ between rounds.
    if apply_weights == "loss_weight":
        assert len({tuple(w) for *_, w in full.seen}) > 1


def test_lightning_alone_restarts_the_epoch(tmp_path, tiny_teacher_dir) -> None:
    """What Lightning does without the sampler's state: it restarts the epoch's iterator, so a
    run resumed after 3 of 6 batches trains on the epoch's first 3 batches again (here: a
    checkpoint with the sampler state removed, as written before the sampler kept one)."""
    cache = tmp_path / "cache"
    full, _ = _fit(tmp_path / "full", tiny_teacher_dir, cache, 6, estimate_every_n_steps=None)
    _fit(tmp_path / "first", tiny_teacher_dir, cache, 3, estimate_every_n_steps=None)
    ckpt = tmp_path / "first" / "ckpt" / "step=3.ckpt"
    state = torch.load(ckpt, weights_only=False)
    state["DistillDataModule"].pop("sampler")
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    resumed, messages = _fit(tmp_path / "resumed", tiny_teacher_dir, cache, 6,
                             ckpt_path=str(old), estimate_every_n_steps=None)  # fmt: skip
    assert [b for _, _, b, _ in resumed.seen] == [b for _, _, b, _ in full.seen[:3]]
    assert any("not resumable" in m for m in messages)


def test_sampler_state_round_trip(tmp_path, tiny_teacher_dir) -> None:
    """Without a Trainer: a sampler restored from another's state mid-epoch continues its draws
    (the resume position comes from the Trainer, so here it restarts the saved epoch)."""
    dm = tiny_paced_datamodule(tiny_teacher_dir, tmp_path / "cache", apply_weights="sampling")
    dm.setup()
    dm.set_pass_rates(torch.tensor([i % 5 for i in range(len(dm.train_problems))]))
    first = PacedSampler(dm, num_samples=30, seed=1)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(8)]
    state = first.state_dict()
    rest = list(it)
    assert state["epoch"] == 2 and len(state["indices"]) == 8
    second = PacedSampler(dm, num_samples=30, seed=1)
    second.load_state_dict(state)
    second.set_epoch(2)
    assert list(second) == head + rest
    # Another epoch ignores the saved one.
    third = PacedSampler(dm, num_samples=30, seed=1)
    third.load_state_dict(state)
    third.set_epoch(3)
    fresh = PacedSampler(dm, num_samples=30, seed=1)
    fresh.set_epoch(3)
    assert list(third) == list(fresh)


def test_text_data_resumes_mid_epoch(tmp_path, tiny_teacher_dir) -> None:
    """The TextDataModule's shuffled epochs continue at the same position too (8 batches an
    epoch, stopped after 3, run into the second epoch), and each epoch is a new permutation."""
    from lrkd.data.text import TextDataModule

    class Tokens(Callback):
        def __init__(self) -> None:
            self.seen: list[list[int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seen.append(batch["input_ids"][:, :6].flatten().tolist())

    def fit(root: Path, max_steps: int, ckpt_path: str | None = None) -> Tokens:
        data = TextDataModule(tokenizer=str(tiny_teacher_dir), seq_length=16, batch_size=4,
                              builtin_documents=12, val_fraction=0.0)  # fmt: skip
        module = DistillationModule(
            teacher=str(tiny_teacher_dir), teacher_dtype="float32",
            student=FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0),
        )  # fmt: skip
        tokens = Tokens()
        trainer = Trainer(
            accelerator="cpu", max_steps=max_steps, limit_train_batches=8, logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
            callbacks=[tokens, ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1,
                                               save_top_k=-1, filename="{step}")],
        )  # fmt: skip
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return tokens

    full = fit(tmp_path / "full", 11)
    fit(tmp_path / "first", 3)
    resumed = fit(tmp_path / "resumed", 11, str(tmp_path / "first" / "ckpt" / "step=3.ckpt"))
    assert resumed.seen == full.seen[3:]
    assert full.seen[8:11] != full.seen[0:3]  # epoch 1 is shuffled anew
