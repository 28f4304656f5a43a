"""``lrkd export``: the student of a ``lrkd fit`` checkpoint as a plain Hugging Face model
directory (a low-rank clone multiplied out), readable without lrkd."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from lrkd.callbacks.export import check_empty_dir, export_student
from lrkd.module import DistillationModule
from lrkd.preflight import check_writable

__all__ = ["export", "read_checkpoint"]


def export(
    ckpt_path: str,
    out: str,
    teacher: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the student of a ``lrkd fit`` checkpoint as a Hugging Face model directory.

    The student is rebuilt from the config recorded in the checkpoint, its trained weights are
    loaded, a low-rank clone is multiplied out into a plain model, and the model is written
    with the teacher's tokenizer. The result loads with ``AutoModelForCausalLM.from_pretrained``
    without lrkd.

    Args:
        ckpt_path: a checkpoint written by ``lrkd fit`` (e.g. ``runs/x/checkpoints/last.ckpt``):
            a file, or the folder of a sharded checkpoint (FSDP2 with
            ``save_distributed_checkpoint: true``), which is read in this one process (the
            whole checkpoint must fit in CPU memory).
        out: the output directory: new or empty, unless ``overwrite``.
        teacher: load the teacher from here instead of the location recorded in the
            checkpoint (e.g. after moving to another machine).
        dtype: dtype of the written weights: ``float32`` or ``bfloat16``.
        overwrite: write into a non-empty ``out``, replacing the files the export writes (other
            files there are never changed or deleted).
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype={dtype!r}; choose float32 or bfloat16.")
    if not overwrite:  # before the (slow) load
        check_empty_dir(Path(out), "--out")
    check_writable(Path(out), "--out")
    path = Path(ckpt_path)
    if path.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            single = _single_file(path, Path(tmp) / "checkpoint.ckpt")
            written = _export_file(single, ckpt_path, out, teacher, dtypes[dtype], overwrite)
    elif path.is_file():
        written = _export_file(path, ckpt_path, out, teacher, dtypes[dtype], overwrite)
    else:
        raise FileNotFoundError(f"--ckpt_path={ckpt_path!r}: no such checkpoint file or folder.")
    logging.getLogger("lrkd").warning("lrkd: exported the student of %s to %s", ckpt_path, written)
    return written


def _export_file(
    path: Path, name: str, out: str, teacher: str | None, dtype: Any, overwrite: bool
) -> Path:
    # mmap: only the hyperparameters are read here; the weights are loaded once, below.
    hparams = read_checkpoint(path, "--ckpt_path").get("hyper_parameters", {})
    if "student" not in hparams:
        raise ValueError(
            f"{name} does not record how its student was built (it was not written by "
            "`lrkd fit`). Load the module in Python and call "
            "lrkd.callbacks.export.export_student(module.student, out, tokenizer)."
        )
    overrides: dict[str, Any] = {"teacher_dtype": "float32"}
    if teacher is not None:
        overrides["teacher"] = teacher
    module = DistillationModule.load_from_checkpoint(path, map_location="cpu", **overrides)
    return export_student(module.student, out, module.tokenizer, dtype=dtype, overwrite=overwrite)


def read_checkpoint(path: Path, field: str) -> dict[str, Any]:
    """The checkpoint file ``path``, memory-mapped (the weights are read only when touched).

    Raises:
        ValueError: naming ``field``: the file is truncated, still being written, or not a
            Lightning checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ValueError(
            f"{field}={str(path)!r} is not a readable checkpoint (truncated, still being written, "
            "or another kind of file); give a .ckpt written by lrkd fit."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{field}={str(path)!r} is not a Lightning checkpoint (no state_dict); give a .ckpt "
            "written by lrkd fit."
        )
    return checkpoint


def _single_file(folder: Path, target: Path) -> Path:
    """Gather a sharded checkpoint folder (torch.distributed.checkpoint shards + Lightning's
    ``meta.pt``) into one checkpoint file with the model weights, in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = folder / "meta.pt"  # Lightning's metadata file: hyperparameters, loops, callbacks
    if not meta.is_file():
        raise FileNotFoundError(
            f"--ckpt_path={str(folder)!r} is a folder without meta.pt; give a checkpoint file, or "
            "a sharded checkpoint folder written by `lrkd fit` under FSDP2."
        )
    weights = target.with_name("weights.pt")
    dcp_to_torch_save(folder, weights)
    checkpoint = torch.load(meta, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = torch.load(weights, map_location="cpu")["state_dict"]
    weights.unlink()
    torch.save(checkpoint, target)
    return target
