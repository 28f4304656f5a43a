"""Checks made when ``lrkd fit`` starts, before any work, so that a run fails in seconds rather
than at its first checkpoint: the output directories can be written, the trainer will train,
the hardware the config asks for is there, and a resumed run matches its checkpoint.

See docs/failures.md ("What is checked at startup", "Resuming").
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

from lrkd.callbacks.export import ExportStudent

log = logging.getLogger("lrkd")

__all__ = [
    "RESUME_CHANGEABLE",
    "check_hardware",
    "check_trainer",
    "check_writable",
    "resume_differences",
]

#: Model settings that a resumed run may change: the config's value is used and the change
#: logged. Any other difference from the checkpoint (teacher, student, optimizer, scheduler)
#: is refused: the weights or the optimizer state restored from the checkpoint would not fit.
RESUME_CHANGEABLE: tuple[str, ...] = (
    "loss",
    "on_policy",
    "fused_head",
    "activation_checkpointing",
    "teacher_dtype",
)


def check_writable(path: Path, field: str) -> None:
    """Raise unless a directory ``path`` exists and can be written, or can be made.

    Nothing is created: a temporary file is made and removed in the nearest existing
    ancestor. (``os.access`` is not enough: it says yes to root on a read-only filesystem.)

    Raises:
        OSError: naming ``field``, the path and the fix.
    """
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(
            f"{field}={str(path)!r}: {str(probe)!r} is a file, not a directory; choose another "
            "path."
        )
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise PermissionError(
            f"{field}={str(path)!r} cannot be written ({str(probe)!r}: {err.strerror}); choose "
            "a writable directory."
        ) from err


def check_hardware(accelerator: Any, strategy: Any) -> None:
    """Refuse a GPU accelerator on a machine without CUDA, and FSDP1 on CPU, with the fix.

    Raises:
        ValueError: naming ``trainer.accelerator`` or ``trainer.strategy``.
    """
    wants_gpu = str(accelerator).lower() in ("gpu", "cuda")
    fsdp1 = isinstance(strategy, FSDPStrategy)
    if wants_gpu and not torch.cuda.is_available():
        hint = " (FSDP1 needs CUDA; on CPU use configs/strategies/fsdp2.yaml)" if fsdp1 else ""
        raise ValueError(
            f"trainer.accelerator={accelerator}, but this machine has no CUDA GPU{hint}; set "
            "trainer.accelerator: auto or cpu."
        )
    if fsdp1 and (str(accelerator).lower() == "cpu" or not torch.cuda.is_available()):
        raise ValueError(
            f"trainer.strategy={type(strategy).__name__} (FSDP1) needs CUDA GPUs; on CPU use "
            "configs/strategies/fsdp2.yaml (lrkd.distributed.FSDP2Strategy)."
        )


def check_trainer(trainer: Trainer) -> None:
    """Refuse a run that would train nothing, and output directories that cannot be written.

    Raises:
        ValueError: ``trainer.max_steps`` or ``trainer.max_epochs`` is 0.
        OSError: a checkpoint, export or log directory cannot be written.
    """
    for name in ("max_steps", "max_epochs"):
        if getattr(trainer, name) == 0:
            raise ValueError(
                f"trainer.{name}=0: nothing would be trained (and the untrained student "
                f"exported); set trainer.{name} above 0."
            )
    for field, path in _output_dirs(trainer):
        check_writable(Path(path), field)


def _output_dirs(trainer: Trainer) -> Iterator[tuple[str, str]]:
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        name = type(callback).__name__
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            yield f"trainer.callbacks ({name}).dirpath", str(callback.dirpath)
        if isinstance(callback, ExportStudent) and callback.dirpath:
            yield f"trainer.callbacks ({name}).dirpath", str(callback.dirpath)
    for logger in trainer.loggers:
        if logger.save_dir:
            yield f"trainer.logger ({type(logger).__name__}).save_dir", str(logger.save_dir)
    yield "trainer.default_root_dir", str(trainer.default_root_dir)


def resume_differences(
    given: Mapping[str, Any], saved: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """The model settings in which a config differs from the checkpoint it resumes.

    Args:
        given: the config's ``model`` section.
        saved: the checkpoint's (the hyperparameters ``lrkd fit`` saved).

    Returns:
        ``(refused, changed)``: ``field: checkpoint -> config`` lines, for settings a resume
        cannot change and for those it may (:data:`RESUME_CHANGEABLE`).
    """
    refused: list[str] = []
    changed: list[str] = []
    for key, old, new in _leaf_differences(saved, given):
        line = f"model.{key}: {old!r} in the checkpoint, {new!r} in the config"
        (changed if key.split(".")[0] in RESUME_CHANGEABLE else refused).append(line)
    return refused, changed


def _leaf_differences(old: Any, new: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            if str(key).startswith("_"):  # Lightning's own entries (_instantiator, ...)
                continue
            yield from _leaf_differences(
                old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key)
            )
    elif old != new:
        yield prefix, old, new
