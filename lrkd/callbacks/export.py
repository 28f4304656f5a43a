"""Export the trained student as a plain Hugging Face model directory at the end of training."""

from __future__ import annotations

import copy
import logging
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
) -> Path:
    """Save ``student`` (and ``tokenizer``) as a directory ``from_pretrained`` loads.

    A student with a ``materialize()`` method (e.g. a low-rank clone) is materialised into a
    plain model first.

    Args:
        student: the trained student.
        out_dir: the output directory (created if needed).
        tokenizer: saved alongside when given.
        dtype: cast the written weights (the student itself is not changed); ``None`` keeps
            them.

    Raises:
        TypeError: the student is neither a Hugging Face model nor materialisable into one.
    """
    model = student.materialize() if isinstance(student, Materializable) else student
    if dtype is not None and hasattr(model, "save_pretrained"):
        model = copy.deepcopy(model).to(dtype) if model is student else model.to(dtype)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"cannot export a {type(model).__name__} as a Hugging Face model: it has no "
            "save_pretrained (or materialize) method; save its state_dict from the checkpoint."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors by default
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


class ExportStudent(Callback):
    """At the end of ``fit``, write the student and tokenizer as a Hugging Face model dir.

    Args:
        dirpath: where to write it; ``None`` uses ``<log_dir>/student``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the student (every rank gathers a sharded student; rank zero writes)."""
        dirpath = self.dirpath or str(Path(trainer.log_dir or trainer.default_root_dir) / "student")
        tokenizer = getattr(pl_module, "tokenizer", None)
        student = pl_module.student
        if is_sharded(student):  # gathering is collective: every rank takes part
            student = generation_model(student)
        if trainer.is_global_zero:
            out = export_student(student, dirpath, tokenizer)
            log.warning("lrkd: exported the student to %s", out)
        trainer.strategy.barrier("lrkd-export")
