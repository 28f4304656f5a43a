"""Export the trained student as a plain Hugging Face model directory at the end of training."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lrkd.distributed import is_sharded
from lrkd.generation.sampling import generation_model
from lrkd.models.protocols import Materializable

log = logging.getLogger("lrkd")


def export_student(
    student: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    field: str = "--out",
) -> Path:
    """Save ``student`` (and ``tokenizer``) as a directory ``from_pretrained`` loads.

    A student with a ``materialize()`` method (e.g. a low-rank clone) is materialised into a
    plain model first. The files are written into a temporary folder beside ``out_dir`` and
    then moved in, so an interrupted export leaves ``out_dir`` as it was, and no file in
    ``out_dir`` that the export does not write is ever changed or deleted.

    Args:
        student: the trained student.
        out_dir: the output directory (created if needed).
        tokenizer: saved alongside when given.
        dtype: cast the written weights (the student itself is not changed); ``None`` keeps
            them.
        overwrite: write into a non-empty ``out_dir`` (replacing the files the export writes);
            without it a non-empty directory is refused.
        field: how errors name ``out_dir`` (``--out``, or a callback's ``dirpath``).

    Raises:
        TypeError: the student is neither a Hugging Face model nor materialisable into one.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if not overwrite:
        check_empty_dir(out, field)
    model = student.materialize() if isinstance(student, Materializable) else student
    if dtype is not None and hasattr(model, "save_pretrained"):
        model = copy.deepcopy(model).to(dtype) if model is student else model.to(dtype)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"cannot export a {type(model).__name__} as a Hugging Face model: it has no "
            "save_pretrained (or materialize) method; save its state_dict from the checkpoint."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        model.save_pretrained(staging)  # safetensors by default
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        out.mkdir(exist_ok=True)
        written = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
        for name in written:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _warn_about_other_weights(out, {str(name) for name in written})
    return out


def check_empty_dir(path: Path, field: str) -> None:
    """Raise unless ``path`` is missing or an empty directory.

    Raises:
        FileExistsError: naming ``field``, the number of entries and the fix.
    """
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{field}={str(path)!r} is a file; give a directory.")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"{field}={str(path)!r} is not empty ({len(entries)} "
            f"entr{'y' if len(entries) == 1 else 'ies'}: {shown}); choose a "
            "new directory, or pass --overwrite to replace the files the export writes."
        )


def _warn_about_other_weights(out: Path, written: set[str]) -> None:
    """Weight files beside the export that it did not write (e.g. the shards of an earlier,
    larger export) are left alone, but ``from_pretrained`` may find them: say so."""
    patterns = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
    others = sorted(
        p.name for pattern in patterns for p in out.glob(pattern) if p.name not in written
    )
    if others:
        log.warning("lrkd: %s also holds weight files this export did not write (left as "
                    "they were): %s", out, ", ".join(others))  # fmt: skip


class ExportStudent(Callback):
    """At the end of ``fit``, write the student and tokenizer as a Hugging Face model dir.

    A run that took no optimizer step (``trainer.max_steps: 0``, or resumed at its end) has
    nothing new to export: it writes nothing and says so.

    Args:
        dirpath: where to write it; ``None`` uses ``<log_dir>/student``. The directory is the
            run's own output: a rerun replaces the files it writes there (nothing else).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._start_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Note the step training starts from (after a resume, the checkpoint's)."""
        self._start_step = trainer.global_step

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the student (every rank gathers a sharded student; rank zero writes)."""
        dirpath = self.dirpath or str(Path(trainer.log_dir or trainer.default_root_dir) / "student")
        if self._start_step is None or trainer.global_step == self._start_step:
            log.warning("lrkd: no optimizer step was taken in this run (trainer.max_steps=%s, "
                        "global step %d): the student is not exported to %s",
                        trainer.max_steps, trainer.global_step, dirpath)  # fmt: skip
            return
        tokenizer = getattr(pl_module, "tokenizer", None)
        student = pl_module.student
        if is_sharded(student):  # gathering is collective: every rank takes part
            student = generation_model(student)
        if trainer.is_global_zero:
            out = export_student(student, dirpath, tokenizer, overwrite=True, field="dirpath")
            log.warning("lrkd: exported the student to %s", out)
        trainer.strategy.barrier("lrkd-export")
