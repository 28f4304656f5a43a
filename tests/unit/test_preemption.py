"""PreemptionCheckpoint in one process: where the checkpoint goes, the SIGTERM handler it puts
in place for training and gives back, the stop at the end of an optimizer step (never within a
gradient accumulation), the exit status of Lightning's own SIGTERM stop, and the warnings.
Whole ``lrkd fit`` runs that are signalled or killed are in tests/preemption/ and
tests/distributed/test_preemption_ddp.py."""

from __future__ import annotations

import logging
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lrkd.callbacks.preemption import PREEMPTED_EXIT_STATUS, Preempted, PreemptionCheckpoint
from lrkd.checkpointing import AtomicCheckpointIO, temporary_path


def test_exit_status_is_128_plus_sigterm() -> None:
    assert PREEMPTED_EXIT_STATUS == 143
    stop = Preempted("x/last.ckpt", 7)
    assert isinstance(stop, SystemExit) and stop.code == 143 and stop.step == 7


@pytest.mark.parametrize("filename", ["", "last.ckpt", "dir/last"])
def test_a_filename_with_extension_or_directory_is_refused(filename: str) -> None:
    with pytest.raises(ValueError, match=r"PreemptionCheckpoint\(filename=.*dirpath"):
        PreemptionCheckpoint(filename=filename)


def test_checkpoint_path(tmp_path) -> None:
    with_model_checkpoint = SimpleNamespace(
        checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path / "ckpt")),
        default_root_dir=str(tmp_path),
    )
    without = SimpleNamespace(checkpoint_callback=None, default_root_dir=str(tmp_path))
    path = PreemptionCheckpoint().checkpoint_path
    assert path(with_model_checkpoint) == f"{tmp_path}/ckpt/last.ckpt"
    assert path(without) == f"{tmp_path}/checkpoints/last.ckpt"
    explicit = PreemptionCheckpoint(dirpath="s3://bucket/run/", filename="preempted")
    assert explicit.checkpoint_path(with_model_checkpoint) == "s3://bucket/run/preempted.ckpt"


class _Recorder(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(trainer.global_step)


class _SigtermAtBatch(Callback):
    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGTERM)


def _trainer(tmp_path, *callbacks: Callback, **kwargs) -> Trainer:
    return Trainer(**{
        "default_root_dir": tmp_path, "max_steps": 6, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
        "accelerator": "cpu", "devices": 1, "plugins": [AtomicCheckpointIO()],
        "callbacks": list(callbacks), **kwargs,
    })  # fmt: skip


def test_sigterm_within_an_accumulation_stops_at_the_end_of_the_optimizer_step(
    tmp_path, caplog
) -> None:
    """SIGTERM after micro-batch 3 of 2-batch accumulations (in the middle of step 2): training
    stops after micro-batch 4, with step 2 done and saved; the handler is given back after."""
    before = signal.getsignal(signal.SIGTERM)
    recorder = _Recorder()
    trainer = _trainer(tmp_path, recorder, _SigtermAtBatch(2), PreemptionCheckpoint(),
                       accumulate_grad_batches=2)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="lrkd"), pytest.raises(Preempted) as stop:
        trainer.fit(BoringModel())
    path = tmp_path / "checkpoints" / "last.ckpt"
    assert (stop.value.code, stop.value.step, stop.value.path) == (143, 2, str(path))
    assert recorder.steps == [0, 1, 1, 2]  # global_step after each micro-batch
    assert torch.load(path, weights_only=False)["global_step"] == 2
    assert f"lrkd: SIGTERM: saved {path} at step 2" in caplog.text
    assert not trainer.received_sigterm  # the callback's handler had it, not Lightning's
    assert signal.getsignal(signal.SIGTERM) == before


def test_stale_temporaries_are_removed_and_late_callbacks_named_at_fit_start(
    tmp_path, caplog
) -> None:
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    stale = temporary_path(checkpoints / "step=4.ckpt", pid=2**22 + 1)  # above Linux's pid_max
    stale.write_bytes(b"partial")
    trainer = _trainer(tmp_path, PreemptionCheckpoint(), _Recorder(),
                       ModelCheckpoint(dirpath=checkpoints), max_steps=1,
                       enable_progress_bar=True)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        trainer.fit(BoringModel())
    assert not stale.exists()
    assert "removed 1 partial checkpoint file(s)" in caplog.text
    # Lightning's own progress bar (appended after every callback) is not worth a warning.
    assert "trainer.callbacks: _Recorder come(s) after PreemptionCheckpoint" in caplog.text


def test_forwards_the_signal_once_to_the_ranks_it_launched() -> None:
    killed: list[int] = []
    callback = PreemptionCheckpoint()
    callback._launcher = SimpleNamespace(kill=killed.append)
    callback._on_sigterm(signal.SIGTERM, None)
    callback._on_sigterm(signal.SIGTERM, None)
    assert killed == [signal.SIGTERM] and callback._signalled


def test_lightnings_own_sigterm_stop_exits_143_too() -> None:
    callback = PreemptionCheckpoint()
    lightning_stop, other = SIGTERMException(), SystemExit(0)
    callback.on_exception(None, None, lightning_stop)
    callback.on_exception(None, None, other)
    assert lightning_stop.code == 143 and other.code == 0
