"""Checks shared by the DataModules: argument ranges and choices by their config names, and
text files that are not UTF-8 (named by file, line and byte offset)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_at_least", "check_choice", "check_fraction", "not_utf8", "read_utf8"]


def check_at_least(field: str, value: float | None, minimum: float) -> None:
    """Raise unless ``value`` is at least ``minimum`` (``None`` passes: an unset option).

    Args:
        field: the config name, e.g. ``data.batch_size``.
        value: the value given.
        minimum: the smallest value allowed.
    """
    if value is not None and value < minimum:
        raise ValueError(f"{field} must be at least {minimum}, got {value}")


def check_fraction(field: str, value: float) -> None:
    """Raise unless ``value`` is a share in ``[0, 1)`` (``field`` names it in the error)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{field} must be in [0, 1), got {value}")


def check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``choices`` (``field`` names it in the error)."""
    if value not in choices:
        raise ValueError(f"{field}={value!r}; choose one of {', '.join(choices)}.")


def not_utf8(path: Path, data: bytes | None = None) -> ValueError:
    """The error for a file that is not UTF-8 text: its first undecodable byte, by line and
    offset. ``data`` is the file's content (read again when not given)."""
    data = path.read_bytes() if data is None else data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); re-encode the file as UTF-8"
        )
    return ValueError(f"{path}: not UTF-8 text; re-encode the file as UTF-8")


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file, every line ending read as a newline (as
    :meth:`Path.read_text` does) and a leading byte-order mark dropped.

    Raises:
        ValueError: the file is not UTF-8, naming it, the line and the byte offset.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise not_utf8(path, data) from err
    return text.replace("\r\n", "\n").replace("\r", "\n")
