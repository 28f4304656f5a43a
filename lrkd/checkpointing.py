"""Checkpoint files that are either complete or absent, and no temporaries left behind.

Lightning's ``TorchCheckpointIO`` serialises a checkpoint into memory and writes it through an
fsspec transaction, whose local temporary file goes to the system temp dir (``$TMPDIR``): a
process killed during the write leaves that file there for good, and the in-memory copy doubles
the checkpoint's footprint. :class:`AtomicCheckpointIO` streams ``torch.save`` into a hidden
temporary file beside the target (``.<name>.<pid>.tmp``), syncs it to disk and renames it onto
the target, so a reader sees the old checkpoint or the new one, never half of one; and a
temporary that a killed process left is recognisable by its name and removed by
:func:`remove_stale_temporaries` when the next run starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("lrkd")

__all__ = [
    "AtomicCheckpointIO",
    "remove_stale_temporaries",
    "save_atomically",
    "temporary_path",
]

#: ``.<target name>.<pid>.tmp``: the temporary a process writes before renaming it onto the
#: target.
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.tmp$")


def temporary_path(target: Path, pid: int | None = None) -> Path:
    """The temporary file beside ``target`` that process ``pid`` (default: this one) writes."""
    return target.with_name(f".{target.name}.{os.getpid() if pid is None else pid}.tmp")


def save_atomically(obj: Any, target: Path) -> None:
    """``torch.save(obj)`` to ``target`` so that ``target`` is never a partial file.

    The object is streamed into :func:`temporary_path` (same directory, so the rename cannot
    cross file systems), synced to disk, and renamed onto ``target``; the rename replaces a
    symbolic link at ``target`` rather than writing through it. On any failure, including an
    interrupt, the temporary is removed and ``target`` is left as it was.

    Args:
        obj: anything ``torch.save`` accepts (a Lightning checkpoint dict).
        target: the file to write; its directory is created if needed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(target)
    try:
        with temporary.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_directory(target.parent)


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the new entry survives a power loss)."""
    # Some file systems (and Windows) refuse fsync on a directory; the rename is still atomic
    # for readers there, only its durability across a crash is up to the file system.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the checkpoint temporaries in ``directory`` whose writer is no longer running.

    A temporary is a file named like :func:`temporary_path`; a process killed during a
    checkpoint write (SIGKILL, out of memory, node failure) leaves one. Temporaries of live
    processes (a write in progress) are kept. The process id is looked up on this machine: on a
    file system shared by several nodes, call this only where no other job writes checkpoints
    into the same directory at the same time (the job's own writes come later, from rank zero).

    Args:
        directory: a checkpoint directory; a missing one is no error.

    Returns:
        The removed files.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.match(path.name)
        if match is None or not path.is_file() or _pid_running(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):  # another cleaner got there first
            path.unlink()
            removed.append(path)
    if removed:
        log.warning(
            "lrkd: removed %d partial checkpoint file(s) left by killed runs in %s: %s",
            len(removed), folder, ", ".join(p.name for p in removed),
        )  # fmt: skip
    return removed


def _local_path(path: str | os.PathLike[str]) -> Path | None:
    """``path`` as a local file path, or ``None`` for a remote (fsspec) URL."""
    fs, stripped = url_to_fs(str(path))
    return Path(stripped) if isinstance(fs, LocalFileSystem) else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local checkpoint files are written atomically beside the
    target (:func:`save_atomically`): no partial checkpoint, nothing in ``$TMPDIR``, one copy of
    the checkpoint in memory instead of two. Remote URLs (``s3://``, ``gs://``, ...) are written
    by ``TorchCheckpointIO`` itself. Loading and removing are ``TorchCheckpointIO``'s.
    """

    def save_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        """Write ``checkpoint`` to ``path``.

        Args:
            checkpoint: the state Lightning dumped.
            path: the checkpoint file (local path, ``file://`` URL or remote URL).
            storage_options: not supported (as in ``TorchCheckpointIO``).

        Raises:
            TypeError: ``storage_options`` were given.
        """
        local = _local_path(path)
        if local is None or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        log.debug("lrkd: saving checkpoint %s", local)
        save_atomically(checkpoint, local)
