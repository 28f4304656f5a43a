"""Records from local files: plain text, or prompt + response, each with the place it came from.

Sources are ``.txt``, ``.jsonl``/``.json``, ``.parquet`` and ``.arrow`` files, directories of
them (searched recursively, in name order) and directories written by Hugging Face
``datasets``' ``save_to_disk`` (their ``train`` split when they hold several).

- A ``.txt`` file is one document per blank-line-separated paragraph.
- Every other record is a mapping with a ``text`` field (plain text) or ``prompt`` and
  ``response`` fields (the field names are configurable).

Every malformed record fails with its file and line (or row) number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lrkd.data.checks import not_utf8, read_utf8

__all__ = [
    "SUFFIXES",
    "expand_sources",
    "is_saved_dataset",
    "jsonl_rows",
    "located_records",
    "read_records",
]

#: File types read as records.
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".arrow")

_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS)


def expand_sources(paths: list[str], field: str = "data.train_files") -> list[Path]:
    """The record sources of ``paths``: files as given, a saved ``datasets`` directory as one
    source, any other directory as its files of a supported type and the saved ``datasets``
    directories in it (recursively, sorted).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file of an unsupported type, or a directory with no data files.
    """
    sources: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{field}: data file not found: {path}")
        if path.is_file() or is_saved_dataset(path):
            _check_suffix(path, field)
            sources.append(path)
            continue
        found = _directory_sources(path)
        if not found:
            raise ValueError(
                f"{field}: directory {path} holds no data files ({', '.join(SUFFIXES)}) and is "
                "not a saved datasets directory"
            )
        sources.extend(found)
    return sources


def _directory_sources(path: Path) -> list[Path]:
    """The data files under ``path`` (recursively, sorted), a saved ``datasets`` directory in it
    as one source (not its own Arrow and JSON files)."""
    saved: list[Path] = []
    found: list[Path] = []
    for p in sorted(path.rglob("*")):  # a directory sorts before what it holds
        if any(s in p.parents for s in saved):
            continue
        if is_saved_dataset(p):
            saved.append(p)
            found.append(p)
        elif p.is_file() and p.suffix.lower() in SUFFIXES:
            found.append(p)
    return found


def _check_suffix(path: Path, field: str) -> None:
    if path.is_file() and path.suffix.lower() not in SUFFIXES:
        raise ValueError(
            f"{field}: {path}: unsupported file type {path.suffix!r}; use "
            f"{', '.join(SUFFIXES)}, a directory of them or a saved datasets directory"
        )


def read_records(
    path: str | Path, text_field: str = "text", prompt_field: str = "prompt",
    response_field: str = "response",
) -> Iterator[dict[str, str]]:  # fmt: skip
    """Yield ``{"text": ...}`` or ``{"prompt": ..., "response": ...}`` records from a source.

    Raises:
        ValueError: a malformed line or record, or text that is not UTF-8, naming the file and
            line (or row) number.
        FileNotFoundError: the file does not exist.
    """
    for _, record in located_records(path, text_field, prompt_field, response_field):
        yield record


def located_records(
    path: str | Path, text_field: str = "text", prompt_field: str = "prompt",
    response_field: str = "response",
) -> Iterator[tuple[str, dict[str, str]]]:  # fmt: skip
    """Yield ``(where, record)`` pairs: each record of :func:`read_records` with its place,
    ``"<file>:<line>"`` (``"<file>:<row>"`` in parquet, Arrow and saved datasets; the file for
    a ``.txt`` paragraph)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for paragraph in read_utf8(path).split("\n\n"):
            if paragraph.strip():
                yield str(path), {"text": paragraph.strip()}
        return
    if is_saved_dataset(path):
        rows: Iterator[tuple[int, Any]] = _saved_dataset_rows(path)
    elif suffix in (".jsonl", ".json"):
        rows = _json_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    elif suffix == ".arrow":
        rows = _arrow_rows(path)
    else:
        raise ValueError(
            f"{path}: unsupported file type {suffix!r}; use {', '.join(SUFFIXES)} or a saved "
            "datasets directory"
        )
    for line_no, row in rows:
        yield f"{path}:{line_no}", _record(f"{path}:{line_no}", row, text_field, prompt_field,
                                           response_field)  # fmt: skip


def _record(
    where: str, row: Any, text_field: str, prompt_field: str, response_field: str
) -> dict[str, str]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if prompt_field in row and response_field in row:
        prompt, response = row[prompt_field], row[response_field]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"{where}: {prompt_field!r} and {response_field!r} must be strings")
        return {"prompt": prompt, "response": response}
    if text_field in row:
        if not isinstance(row[text_field], str):
            raise ValueError(f"{where}: {text_field!r} must be a string")
        return {"text": row[text_field]}
    raise ValueError(
        f"{where}: record has neither {text_field!r} nor {prompt_field!r}+{response_field!r}; "
        f"its keys are {sorted(row)}"
    )


def jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed JSON)`` for every non-blank line of a UTF-8 JSONL file (a
    leading byte-order mark is dropped).

    Raises:
        ValueError: a line that is not JSON, or not UTF-8, naming the file and line number.
    """
    with path.open(encoding="utf-8-sig") as f:
        lines = enumerate(f, start=1)
        while True:
            try:
                line_no, line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError as err:
                raise not_utf8(path) from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({err.msg})") from err
            yield line_no, row


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """JSON lines, or the items of a file holding one JSON array (numbered from 1)."""
    with path.open("rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        yield from jsonl_rows(path)
        return
    try:
        items = json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from err
    yield from enumerate(items, start=1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: a text column is not UTF-8 ({err.reason}); write it as UTF-8 strings"
        ) from err
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err


def _arrow_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                reader: Any = pa.ipc.open_stream(source)  # datasets' own cache files
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            row = 0
            for batch in batches:
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
    except (OSError, pa.ArrowInvalid) as err:
        raise ValueError(f"{path}: not a readable Arrow file ({err})") from err


def _saved_dataset_rows(path: Path) -> Iterator[tuple[int, Any]]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(
                f"{path}: a saved DatasetDict without a 'train' split (it has "
                f"{sorted(dataset)}); give the split's directory, e.g. {path / sorted(dataset)[0]}"
            )
        dataset = dataset["train"]
    row = 0
    for batch in dataset.with_format("arrow").iter(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record
