"""Helpers of the pre-emption tests: tiny ``lrkd fit`` configs run as subprocesses
(``python -m lrkd.cli``), callbacks that record each step's loss and the final weights, that
signal the run at a given step, and a CheckpointIO that stalls in the middle of a write so that
the test can kill the process there.

Everything a config names by ``class_path`` lives here (``preemption.tools.*``, importable with
``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback

from lrkd.checkpointing import AtomicCheckpointIO
from lrkd.data.verifiers import Verifier

TESTS = Path(__file__).resolve().parents[1]
WORKTREE = TESTS.parent


class RecordRun(Callback):
    """Appends ``{"step", "loss"}`` per optimizer step to ``<out>/losses_rank<r>.jsonl`` (the
    rank's own loss, exact as ``repr``), the step at which an exception stopped the run to
    ``<out>/stopped_rank<r>.json``, and at the end of fit a sha256 of the student's weights to
    ``<out>/weights_rank<r>.txt``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def _file(self, trainer: Any, stem: str, suffix: str) -> Path:
        return self.out / f"{stem}_rank{trainer.global_rank}.{suffix}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {"step": trainer.global_step - 1, "loss": float(outputs["loss"])}
        with self._file(trainer, "losses", "jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def on_exception(self, trainer, pl_module, exception) -> None:
        stopped = {"step": trainer.global_step, "exception": type(exception).__name__}
        self._file(trainer, "stopped", "json").write_text(json.dumps(stopped))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._file(trainer, "weights", "txt").write_text(weights_digest(pl_module.student))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's state (sorted names, exact bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class SigtermAt(Callback):
    """Sends SIGTERM at the end of optimizer step ``step`` (``trainer.global_step == step``):
    to this process on rank ``rank``, or to the whole process group with ``rank=None`` (as
    SLURM signals every task of a job)."""

    def __init__(self, step: int, rank: int | None = 0) -> None:
        self.step = step
        self.rank = rank
        self._sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._sent or trainer.global_step != self.step:
            return
        self._sent = True
        if self.rank is None and trainer.global_rank == 0:
            os.killpg(os.getpgid(0), signal.SIGTERM)
        elif trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


class StallAfter(Callback):
    """Sleeps at the end of optimizer step ``step`` (after the callbacks before it recorded the
    step), the first time only (``marker`` is created), so that a test's SIGKILL lands in the
    middle of training however fast the steps run."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step = step
        self.marker = Path(marker)
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.touch()
            time.sleep(self.seconds)


class StallingCheckpointIO(AtomicCheckpointIO):
    """AtomicCheckpointIO whose write of the checkpoint at ``stall_step`` writes half of the
    file, creates ``marker`` and sleeps (so that the test can SIGKILL the process in the middle
    of the write); once ``marker`` exists it writes normally (the resumed run)."""

    def __init__(self, stall_step: int, marker: str) -> None:
        super().__init__()
        self.stall_step = stall_step
        self.marker = Path(marker)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if checkpoint.get("global_step") != self.stall_step or self.marker.exists():
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        real_save = torch.save

        def half_then_stall(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            self.marker.write_text(str(path))
            time.sleep(600)

        torch.save = half_then_stall
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = real_save


class EvenFirstCharacter(Verifier):
    """Accepts a completion whose first character has an even code (about half of a random
    tiny model's)."""

    def extract(self, completion: str) -> str | None:
        return completion[:1] or None

    def matches(self, candidate: str, answer: str) -> bool:
        return ord(candidate) % 2 == 0


def text_data() -> dict[str, Any]:
    return {
        "class_path": "lrkd.data.text.TextDataModule",
        "init_args": {"seq_length": 32, "batch_size": 4, "builtin_documents": 200},
    }


def paced_data(teacher: Path, cache: Path) -> dict[str, Any]:
    """24 built-in problems, pass rates re-estimated every 2 steps (mid-epoch)."""
    return {
        "class_path": "lrkd.data.datamodule.DistillDataModule",
        "init_args": {
            "tokenizer": str(teacher),
            "num_problems": 24,
            "val_fraction": 0.25,
            "chat_template": False,
            "verifier": {"class_path": "preemption.tools.EvenFirstCharacter"},
            "teacher_responses": {"max_new_tokens": 5, "cache_dir": str(cache)},
            "rollouts": {"num_samples": 2, "max_new_tokens": 3},
            "pacing": {"estimate_every_n_steps": 2, "estimate_every_n_epochs": None},
            "validation": {"num_samples": 2},
            "batch_size": 4,
            "seq_length": 48,
            "overlong": "drop",  # word problems' prompts exceed 48 character tokens
        },
    }


def write_config(
    path: Path,
    teacher: Path,
    out: Path,
    max_steps: int,
    data: dict[str, Any] | None = None,
    callbacks: list[dict[str, Any]] = (),
    plugins: list[dict[str, Any]] = (),
    checkpoint: dict[str, Any] | None = None,
    **trainer: Any,
) -> Path:
    """A tiny fit config: plain KD of a 1-layer student, checkpoints in ``out/ckpt``
    (``checkpoint``: ModelCheckpoint arguments), RecordRun into ``out``, then ``callbacks``.
    PreemptionCheckpoint and AtomicCheckpointIO are not named: `lrkd fit` adds them (the
    latter unless ``plugins`` holds another CheckpointIO), which is what these tests check."""
    out.mkdir(parents=True, exist_ok=True)
    model_checkpoint = {"dirpath": str(out / "ckpt"), **(checkpoint or {"save_top_k": 0})}
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": max_steps,
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "default_root_dir": str(out),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": model_checkpoint},
                {"class_path": "preemption.tools.RecordRun", "init_args": {"out": str(out)}},
                *callbacks,
            ],
            "plugins": list(plugins),
            **trainer,
        },
        "model": {
            "teacher": str(teacher),
            "teacher_dtype": "float32",
            "student": {"class_path": "lrkd.models.students.FromTeacherConfig",
                        "init_args": {"hidden_size": 32, "num_hidden_layers": 1, "seed": 0}},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
        },
        "data": data or text_data(),
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def environment(tmpdir: Path) -> dict[str, str]:
    """The subprocess environment: this worktree's lrkd and tests/ first, TMPDIR as given, one
    thread per process (the machine has 2 cores, DDP runs 2 processes)."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    path = [str(WORKTREE), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TMPDIR": str(tmpdir),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def fit_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lrkd.cli", "fit", "--config", str(config), *args]


def fit(
    config: Path, tmpdir: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``lrkd fit`` in its own process group (a group-wide SIGTERM stays in it)."""
    return subprocess.run(
        fit_command(config, *args), env=environment(tmpdir), capture_output=True, text=True,
        timeout=timeout, start_new_session=True,
    )  # fmt: skip


def fit_until(
    config: Path, tmpdir: Path, ready: Callable[[], bool], *args: str, timeout: float = 300
) -> tuple[int, str]:
    """Start ``lrkd fit``, SIGKILL it (its whole group) once ``ready()`` holds; returns the
    exit status and the output."""
    log = tmpdir.parent / f"{config.stem}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            fit_command(config, *args), env=environment(tmpdir), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        status = proc.wait()
    return status, log.read_text()


def losses(out: Path, rank: int = 0) -> dict[int, float]:
    """The recorded loss of every step; a step recorded twice (trained again after a resume
    from an earlier checkpoint) must have had the same loss both times."""
    path = out / f"losses_rank{rank}.jsonl"
    found: dict[int, float] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        assert found.setdefault(row["step"], row["loss"]) == row["loss"], (row, found)
    return found


def output_tail(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-5000:]
