"""PreemptionCheckpoint: on SIGTERM, save a checkpoint at the end of the optimizer step and exit
with status 143, so that a pre-empted job keeps its work and is not reported as a success.

SLURM and Kubernetes send SIGTERM some time before they kill a job. Lightning on its own stops
at its next check and exits with status 0, without a checkpoint. Its own handling is also
unsafe with several processes: its signal handler runs a ``broadcast`` at whatever point each
rank happens to be (a collective that pairs with an unrelated one on the other ranks), and each
rank raises ``SIGTERMException`` at its own next check. With the signal on rank 1 only, in a
2-process DDP run (gloo, Lightning 2.6.6), rank 1 leaves alone with status 0 and rank 0 fails in
its next collective (status 1, no checkpoint); and a callback that all-reduces
``trainer.received_sigterm`` at the end of each step hangs (rank 1's broadcast in the handler
meets rank 0's all-reduce).

So for the duration of training this callback replaces Lightning's SIGTERM handler with one
that only records the signal (and forwards it once to the ranks this process launched). At the
end of every optimizer step all ranks combine their records (one all-reduce of a flag, so a
signal on any rank stops all of them at the same step), save one checkpoint together
(``trainer.save_checkpoint`` is collective under DDP and FSDP2) and raise :class:`Preempted`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lrkd.checkpointing import remove_stale_temporaries

log = logging.getLogger("lrkd")

__all__ = ["PREEMPTED_EXIT_STATUS", "Preempted", "PreemptionCheckpoint"]

#: The exit status of a pre-empted run: 128 + SIGTERM, what a shell reports for a process that
#: SIGTERM killed; schedulers (SLURM ``--requeue``, Kubernetes Jobs) treat it as a failure.
PREEMPTED_EXIT_STATUS = 128 + int(signal.SIGTERM)


class Preempted(SystemExit):
    """Training stopped on SIGTERM after its checkpoint was saved; exits with status 143.

    Attributes:
        path: the checkpoint written.
        step: the optimizer steps it holds (``trainer.global_step``); resuming continues there.
    """

    def __init__(self, path: str, step: int) -> None:
        super().__init__(PREEMPTED_EXIT_STATUS)
        self.path = path
        self.step = step


class PreemptionCheckpoint(Callback):
    """On SIGTERM, save a checkpoint at the end of the current optimizer step and stop with exit
    status 143 (:class:`Preempted`); re-running the same command with ``--ckpt_path PATH`` (or
    ``--ckpt_path last``) resumes there.

    The signal is acted on at the end of the optimizer step in progress (after every
    micro-batch of a gradient accumulation, so that no accumulated gradient is lost), after a
    validation in progress has finished. The scheduler's grace period must cover that and one
    checkpoint write. At the start of fit, partial checkpoint files that killed runs left in the
    checkpoint directories are removed (:func:`lrkd.checkpointing.remove_stale_temporaries`).

    Put it after every callback that must see the last step's ``on_train_batch_end`` (loss
    recorders, diagnostics): it raises there, so callbacks after it do not see that step
    (``ModelCheckpoint`` excepted: the checkpoint this callback writes supersedes it). A warning
    names any such callback.

    Args:
        dirpath: directory of the checkpoint; ``None``: that of the Trainer's ``ModelCheckpoint``
            (``trainer.checkpoint_callback.dirpath``), or ``<default_root_dir>/checkpoints``
            without one.
        filename: checkpoint file name without ``.ckpt``; the default ``last`` is where
            ``--ckpt_path last`` looks (in a ``ModelCheckpoint``'s directory). A symbolic link
            there (``save_last: link``) is replaced, never written through.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last") -> None:
        if not filename or "/" in filename or filename.endswith(".ckpt"):
            raise ValueError(
                f"PreemptionCheckpoint(filename={filename!r}): give a file name without "
                "directory and without .ckpt (e.g. last); put the directory in dirpath."
            )
        self.dirpath = dirpath
        self.filename = filename
        self._signalled = False
        self._step_checked = -1
        self._launcher: Any = None
        self._previous_handler: Any = None

    def checkpoint_path(self, trainer: Trainer) -> str:
        """Where the checkpoint goes (see ``dirpath`` and ``filename``)."""
        directory = self.dirpath
        if directory is None:
            directory = getattr(trainer.checkpoint_callback, "dirpath", None)
        if directory is None:
            directory = os.path.join(trainer.default_root_dir, "checkpoints")
        return f"{str(directory).rstrip('/')}/{self.filename}.ckpt"

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove stale checkpoint temporaries; name the callbacks that would miss the last
        step (rank zero; the ModelCheckpoints' ``setup`` has resolved their directories)."""
        if trainer.is_global_zero:
            for directory in self._checkpoint_directories(trainer):
                remove_stale_temporaries(directory)
            self._warn_about_later_callbacks(trainer)

    def _checkpoint_directories(self, trainer: Trainer) -> list[str]:
        """This callback's directory and every checkpoint callback's."""
        directories = {os.path.dirname(self.checkpoint_path(trainer))}
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                directories.add(str(callback.dirpath))
        return sorted(directories)

    def _warn_about_later_callbacks(self, trainer: Trainer) -> None:
        later = trainer.callbacks[trainer.callbacks.index(self) + 1 :]
        missing = [
            type(c).__name__
            for c in later
            if type(c).on_train_batch_end is not Callback.on_train_batch_end
            # Lightning runs checkpoints last and appends its progress bar: neither matters.
            and not isinstance(c, ModelCheckpoint | ProgressBar)
        ]
        if missing:
            log.warning(
                "lrkd: trainer.callbacks: %s come(s) after PreemptionCheckpoint and will not see "
                "the step at which a SIGTERM stops training; list PreemptionCheckpoint last.",
                ", ".join(missing),
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Take SIGTERM over from Lightning for the rest of training."""
        # A SIGTERM that came before (during the sanity check) counts too.
        self._signalled = trainer.received_sigterm
        self._step_checked = trainer.global_step
        self._launcher = trainer.strategy.launcher
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Only record it: a collective here would run at an arbitrary point of this rank.
        if not self._signalled and self._launcher is not None:
            self._launcher.kill(signum)  # the ranks this process started, if any
        self._signalled = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        """At the end of an optimizer step: if any rank got SIGTERM, save and stop (all ranks)."""
        if trainer.global_step == self._step_checked:
            return  # within a gradient accumulation: the same on every rank
        self._step_checked = trainer.global_step
        # Lightning's flag too, in case the handler could not be replaced (not the main thread).
        signalled = self._signalled or trainer.received_sigterm
        if not trainer.strategy.reduce_boolean_decision(signalled, all=False):
            return
        path = self.checkpoint_path(trainer)
        self._replace_link(trainer, path)
        self._hand_over_last(trainer, path)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning(
                "lrkd: SIGTERM: saved %s at step %d, stopping with exit status %d; resume with "
                "--ckpt_path %s", path, trainer.global_step, PREEMPTED_EXIT_STATUS, path,
            )  # fmt: skip
        raise Preempted(path, trainer.global_step)

    @staticmethod
    def _replace_link(trainer: Trainer, path: str) -> None:
        """Remove a symbolic link at ``path`` (ModelCheckpoint ``save_last="link"``) so that the
        save replaces the link instead of overwriting the checkpoint it points to."""
        if trainer.is_global_zero and os.path.islink(path):
            os.unlink(path)
        trainer.strategy.barrier("PreemptionCheckpoint")

    def _hand_over_last(self, trainer: Trainer, path: str) -> None:
        """Make the checkpoint the ModelCheckpoint's last one when it has its name and place, so
        that a resumed run's next ``save_last`` replaces it rather than writing
        ``last-v1.ckpt`` beside it (ModelCheckpoint keeps ``last_model_path`` in checkpoints)."""
        callback = trainer.checkpoint_callback
        if self.dirpath is not None or not isinstance(callback, ModelCheckpoint):
            return
        if callback.save_last and self.filename == callback.CHECKPOINT_NAME_LAST:
            callback.last_model_path = path

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """A ``SIGTERMException`` (Lightning's own stop on SIGTERM) exits with status 143 too.

        It arrives only where this callback's handler is not in place: before training started
        (a SIGTERM during the sanity check), or when training does not run in the main thread
        (where no signal handler can be set). No checkpoint is saved here. Lightning raises it
        on the ranks that got the signal only, at points of their own (in validation, within a
        gradient accumulation), so a collective save could hang the other ranks, and a save
        within an accumulation would drop its gradients; before training started there is
        nothing new to save anyway.
        """
        if isinstance(exception, SIGTERMException):
            exception.code = PREEMPTED_EXIT_STATUS

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give SIGTERM back if it is still ours (Lightning restores its originals itself)."""
        if self._previous_handler is not None and (
            signal.getsignal(signal.SIGTERM) == self._on_sigterm
        ):
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None
