"""TwoStageKL: the divergence switches exactly at the configured step, resumes in the right stage,
scales the learning rate once, and announces the switch in TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, stop_after
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from test_on_policy import EOS_IDS, _prompt_response_batch
from torch.utils.data import DataLoader

from lrkd.callbacks.two_stage import TwoStageKL
from lrkd.generation.on_policy import OnPolicy
from lrkd.module import DistillationModule


class Probe(Callback):
    """Records, per micro-batch, the settings the module trains that batch with."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((
            trainer.global_step, pl_module.objective.divergence.kind,
            pl_module.objective.divergence.temperature, pl_module.on_policy.fraction,
        ))  # fmt: skip


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    base, _ = _prompt_response_batch()
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        fresh = torch.randint(40, 120, base["input_ids"].shape, generator=g)
        out.append({**base, "input_ids": torch.where(base["attention_mask"].bool(), fresh, 3)})
    return out


def _module(**kwargs) -> DistillationModule:
    return DistillationModule(
        make_tiny_llama(seed=0),
        make_tiny_llama(seed=1, hidden_size=32, num_attention_heads=2),
        **kwargs,
        on_policy=OnPolicy(max_new_tokens=4, eos_token_id=EOS_IDS),
    )


def _fit(
    root: Path, max_steps: int, callback: TwoStageKL, *, ckpt_path: str | None = None,
    module: LightningModule | None = None, extra_callbacks: list | None = None, **trainer_kwargs,
) -> tuple[Trainer, Probe, list[dict[str, str]]]:  # fmt: skip
    seed_everything(0)
    probe = Probe()
    trainer = Trainer(
        max_steps=max_steps, accelerator="cpu", log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, logger=CSVLogger(root, name="", version=""),
        callbacks=[
            callback, probe,
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1,
                            filename="{step}"),
            *(extra_callbacks or []),
        ],
        **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module or _module(), DataLoader(_batches(), batch_size=None), ckpt_path=ckpt_path)
    with open(root / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return trainer, probe, rows


def _stage_log(rows: list[dict[str, str]]) -> list[tuple[int, int, int]]:
    """(step, logged stage, logged on-policy flag) per logged training step."""
    return [
        (int(r["step"]), int(float(r["train/stage"])), int(float(r.get("train/on_policy") or 0)))
        for r in rows
    ]


def test_divergence_switches_exactly_at_the_configured_step(tmp_path) -> None:
    _, probe, rows = _fit(tmp_path, 8, TwoStageKL(switch_step=5))
    # From the logged values: stage 1 (teacher-forced) before step 5, stage 2 (on-policy) from it.
    expected = [(s, 1, 0) for s in range(5)] + [(s, 2, 1) for s in range(5, 8)]
    assert _stage_log(rows) == expected
    # The divergence the module actually trained each step with.
    assert [(step, kind) for step, kind, _, _ in probe.seen] == (
        [(s, "forward_kl") for s in range(5)] + [(s, "reverse_kl") for s in range(5, 8)]
    )
    # On-policy steps train on the student's completions: at most 4 generated tokens per row,
    # where the data's responses are longer on average.
    tokens = [float(r["train/response_tokens"]) for r in rows if r.get("train/response_tokens")]
    assert len(tokens) == 3 and all(0 < t <= 4 for t in tokens)


def test_switch_fraction_and_temperature(tmp_path) -> None:
    callback = TwoStageKL(
        switch_fraction=0.25, second_temperature=2.0, second_on_policy_fraction=0.5
    )
    _, probe, rows = _fit(tmp_path, 8, callback)
    assert callback.switch_step == 2
    assert [s for s, *_ in probe.seen] == list(range(8))
    assert [(kind, t, f) for _, kind, t, f in probe.seen] == (
        [("forward_kl", 1.0, 0.0)] * 2 + [("reverse_kl", 2.0, 0.5)] * 6
    )
    logged = _stage_log(rows)
    assert [stage for _, stage, _ in logged] == [1, 1] + [2] * 6
    # Half of the stage-2 batches on-policy, chosen by a seeded draw; both kinds occur.
    assert {flag for _, _, flag in logged[2:]} == {0, 1}


def test_switch_applies_to_every_micro_batch_of_the_step(tmp_path) -> None:
    _, probe, _ = _fit(tmp_path, 4, TwoStageKL(switch_step=2), accumulate_grad_batches=2)
    assert [(step, kind) for step, kind, _, _ in probe.seen] == (
        [(0, "forward_kl")] * 2 + [(1, "forward_kl")] * 2
        + [(2, "reverse_kl")] * 2 + [(3, "reverse_kl")] * 2
    )  # fmt: skip


@pytest.mark.parametrize("stop_at", [3, 5, 7], ids=["before", "at", "after"])
def test_resumed_run_matches_uninterrupted_stages(tmp_path, stop_at: int) -> None:
    """Stopped before, exactly at, or after the switch and resumed from the checkpoint: the
    same stage at every step, the switch at the same step, the learning rate scaled once."""

    def callback() -> TwoStageKL:
        return TwoStageKL(switch_step=5, second_lr_scale=0.5)

    full, full_probe, full_rows = _fit(tmp_path / "full", 9, callback())
    _fit(tmp_path / "first", 9, callback(), extra_callbacks=[stop_after(stop_at)])
    resumed, resumed_probe, resumed_rows = _fit(
        tmp_path / "resumed", 9, callback(),
        ckpt_path=str(tmp_path / "first" / "ckpt" / f"step={stop_at}.ckpt"),
    )  # fmt: skip
    assert _stage_log(resumed_rows) == _stage_log(full_rows)[stop_at:]
    assert resumed_probe.seen == full_probe.seen[stop_at:]
    lrs = [trainer.optimizers[0].param_groups[0]["lr"] for trainer in (full, resumed)]
    assert lrs == [pytest.approx(0.5e-3)] * 2  # AdamW's default 1e-3, halved once


def test_lr_scale_moves_a_schedule(tmp_path) -> None:
    """With a warm-up schedule the learning rate keeps following it, scaled from the switch."""
    schedule = lambda step: min(1.0, (step + 1) / 4)  # noqa: E731

    class Record(Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    record = Record()
    module = _module(
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule),
    )
    seed_everything(0)
    trainer = Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        callbacks=[TwoStageKL(switch_step=3, second_lr_scale=0.1), record],
    )  # fmt: skip
    trainer.fit(module, DataLoader(_batches(), batch_size=None))
    expected = [0.1 * schedule(s) * (0.1 if s >= 3 else 1.0) for s in range(6)]
    assert record.lrs == pytest.approx(expected)


def test_switch_note_in_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_everything(0)
    trainer = Trainer(
        max_steps=4, accelerator="cpu", log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        callbacks=[TwoStageKL(switch_step=2, second_lr_scale=0.5)],
    )  # fmt: skip
    trainer.fit(_module(), DataLoader(_batches(), batch_size=None))
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    notes = [
        (e.step, e.tensor_proto.string_val[0].decode())
        for e in events.Tensors("two_stage/switch/text_summary")
    ]
    assert [step for step, _ in notes] == [0, 2]
    assert "stage 1 from step 0: divergence forward_kl" in notes[0][1]
    assert "stage 2 from step 2: divergence reverse_kl" in notes[1][1]
    assert "on-policy fraction 1" in notes[1][1] and "learning rate x0.5" in notes[1][1]
    stages = [(e.step, e.value) for e in events.Scalars("train/stage")]
    assert stages == [(0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of switch_step"),
        ({"switch_step": 3, "switch_fraction": 0.5}, "exactly one of switch_step"),
        ({"switch_step": -1}, "switch_step=-1"),
        ({"switch_fraction": 1.5}, "switch_fraction=1.5"),
        ({"switch_step": 1, "second_divergence": "reverse"}, "second_divergence='reverse'"),
        ({"switch_step": 1, "second_on_policy_fraction": 2.0}, "second_on_policy_fraction=2.0"),
        ({"switch_step": 1, "second_lr_scale": 0.0}, "second_lr_scale=0.0"),
        ({"switch_step": 1, "second_temperature": 0.0}, "second_temperature=0.0"),
    ],
)
def test_bad_settings_fail_clearly(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TwoStageKL(**kwargs)


def test_refuses_a_module_it_cannot_drive(tmp_path) -> None:
    class Plain(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      callbacks=[TwoStageKL(switch_step=1)])  # fmt: skip
    with pytest.raises(TypeError, match="objective and an on_policy sampler"):
        trainer.fit(Plain(), DataLoader([torch.zeros(2)]))


def test_a_switch_after_the_last_step_is_refused_at_startup(tmp_path) -> None:
    probe_steps = []

    class Steps(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            probe_steps.append(trainer.global_step)

    with pytest.raises(ValueError, match=r"switch_step=100, but the run has only 16 optimizer "
                                         r"steps \(trainer.max_steps=16\)"):  # fmt: skip
        _fit(tmp_path, 16, TwoStageKL(switch_step=100), extra_callbacks=[Steps()])
    assert probe_steps == []  # refused before the first step
