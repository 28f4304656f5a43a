"""The manifest of a prepared dataset: what it was made from and how, and the checks that refuse
to train on it when that no longer matches (another tokenizer, another ``seq_length``, changed
source files).

A prepared directory (``lrkd prepare``) holds ``manifest.json`` next to one saved ``datasets``
directory per split. The manifest is written last, so a directory without one is unfinished.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "MANIFEST",
    "PrepareSettings",
    "check_manifest",
    "content_hash",
    "output_holds",
    "read_manifest",
    "source_entry",
    "tokenizer_fingerprint",
]

#: The layout version of prepared directories; a change makes earlier ones be prepared again.
FORMAT = 1
#: The manifest's file name in a prepared directory.
MANIFEST = "manifest.json"

PACK_MODES = ("concat", "documents")


@dataclass(frozen=True)
class PrepareSettings:
    """Everything besides the sources and the tokenizer that decides a prepared dataset.

    Args:
        seq_length: tokens per packed block, and the length prompt+response examples are cut to.
        pack: ``concat`` (documents joined with EOS and cut into full blocks, the last partial
            block dropped) or ``documents`` (each document alone, cut into blocks of at most
            ``seq_length`` and right-padded in the batch, so that no block mixes documents).
        chat_template: format prompts with the tokenizer's chat template when it has one.
        overlong: what to do with prompt+response records whose prompt leaves no room for a
            response token (see :mod:`lrkd.data.overlong`).
        val_fraction: share of records held out for validation when no validation files are
            given.
        seed: seed of the validation hold-out (and of the built-in corpus).
        text_field: the field holding plain text.
        prompt_field: the field holding a prompt.
        response_field: the field holding a response.
        builtin_documents: generated documents when no files are given (the built-in corpus).
    """

    seq_length: int = 256
    pack: str = "concat"
    chat_template: bool = True
    overlong: str = "error"
    val_fraction: float = 0.05
    seed: int = 0
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    builtin_documents: int = 2000

    @property
    def fields(self) -> dict[str, str]:
        """The record field names, as :func:`lrkd.data.records.located_records` takes them."""
        return {"text_field": self.text_field, "prompt_field": self.prompt_field,
                "response_field": self.response_field}  # fmt: skip


def content_hash(path: Path) -> str:
    """A 128-bit xxh3 hash of a file's bytes, or of a directory's files (names and bytes)."""
    import xxhash

    digest = xxhash.xxh3_128()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()


# Content hashes this process computed, by (path, size, modification time): a corpus is hashed
# once per process, not once for the cache key, again for the manifest and again in setup().
_HASHES: dict[tuple[str, int, int], str] = {}


def source_entry(path: Path) -> dict[str, Any]:
    """A source's manifest entry: its absolute path, size, modification time and content hash."""
    stat = path.stat()
    size = stat.st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file()
    )  # fmt: skip
    resolved = str(path.resolve())
    seen = (resolved, size, stat.st_mtime_ns)
    if seen not in _HASHES or not path.is_file():  # a directory's files may change unseen
        _HASHES[seen] = content_hash(path)
    return {"path": resolved, "size": size, "mtime_ns": stat.st_mtime_ns, "hash": _HASHES[seen]}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that decides token ids: its vocabulary, merges,
    normalisation and special tokens, and its chat template."""
    import xxhash

    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest = xxhash.xxh3_128()
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    template = getattr(tokenizer, "chat_template", None) or ""
    digest.update(repr((tokenizer.eos_token_id, tokenizer.bos_token_id, template)).encode())
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a prepared directory.

    Raises:
        FileNotFoundError: ``path`` is not a finished prepared directory.
    """
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(
            f"data.prepared is not a prepared dataset (no {MANIFEST}; an interrupted "
            "lrkd prepare leaves none); prepare it with: lrkd prepare --train_files FILES "
            f"--tokenizer TEACHER --out {path}"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            "data.prepared was prepared by another lrkd version (format "
            f"{manifest.get('format')}, this one reads {FORMAT}); re-prepare: "
            f"{reprepare_command(path)}"
        )
    return manifest


def reprepare_command(out: Path, **changes: Any) -> str:
    """The ``lrkd prepare`` command that prepares ``out`` again from its manifest's sources and
    settings, with ``changes`` (e.g. ``seq_length=128``) applied."""
    args = ["lrkd", "prepare", "--like", str(out)]
    for name, value in changes.items():
        args += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(args)


def remake_advice(path: Path, manifest: dict[str, Any], **changes: Any) -> str:
    """How to make the data at ``path`` again with ``changes``: ``lrkd prepare --like``; for a
    teacher cache, that on the prepared data it was made from, then ``lrkd cache-teacher``."""
    cache = manifest.get("teacher_cache")
    if cache is None:
        return f"re-prepare: {reprepare_command(path, **changes)}"
    source = Path(cache["prepared"]["path"])
    again = shlex.join(["lrkd", "cache-teacher", "--prepared", str(source), "--teacher",
                        cache["teacher"], "--top_k", str(cache["top_k"]), "--temperature",
                        str(cache["temperature"]), "--out", "NEW_CACHE"])  # fmt: skip
    source_again = reprepare_command(source, **changes)
    return (f"it is a teacher cache: re-prepare its source ({source_again}) and cache the "
            f"teacher again ({again})")  # fmt: skip


def check_manifest(
    manifest: dict[str, Any], path: Path, tokenizer: Any, tokenizer_name: str | None,
    settings: PrepareSettings,
) -> None:  # fmt: skip
    """Refuse a prepared dataset that does not match the run: made with another tokenizer than
    the teacher's, another ``seq_length`` (or chat-template setting, for prompt+response data),
    or from source files that changed since. Sources that are no longer there are not checked
    (a prepared directory may travel without them).

    Raises:
        ValueError: naming what differs and the command that prepares the data again (which
            names ``path``: the message does not repeat it, to stay one short line).
    """
    name = tokenizer_name or getattr(tokenizer, "name_or_path", None) or "TEACHER"
    made = manifest["tokenizer"]
    if made["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"data.prepared was tokenised with {made['name']!r}, not with the teacher's "
            f"tokenizer; {remake_advice(path, manifest, tokenizer=name)}"
        )
    made_length = manifest["settings"]["seq_length"]
    if made_length != settings.seq_length:
        raise ValueError(
            f"data.seq_length={settings.seq_length}, but data.prepared has seq_length="
            f"{made_length}; set data.seq_length: {made_length}, or "
            f"{remake_advice(path, manifest, seq_length=settings.seq_length)}"
        )
    made_template = manifest["settings"]["chat_template"]
    if manifest["kind"] == "prompt_response" and made_template != settings.chat_template:
        raise ValueError(
            f"data.chat_template={settings.chat_template}, but data.prepared has "
            f"chat_template={made_template}; set data.chat_template: {made_template}, or "
            f"{remake_advice(path, manifest, chat_template=settings.chat_template)}"
        )
    for entries in manifest["sources"].values():
        for entry in entries:
            changed = _changed(entry)
            if changed:
                raise ValueError(
                    f"data.prepared: source {entry['path']} {changed} since it was prepared; "
                    f"{remake_advice(path, manifest)}"
                )


def _changed(entry: dict[str, Any]) -> str | None:
    """How a source differs from its manifest entry (``None``: unchanged or no longer there).
    Size and modification time are compared first; the content is hashed only when they differ."""
    source = Path(entry["path"])
    if not source.exists():
        return None
    current = source_entry(source) if source.is_dir() else None
    stat = source.stat()
    if current is None and (stat.st_size, stat.st_mtime_ns) == (entry["size"], entry["mtime_ns"]):
        return None
    current = current or source_entry(source)
    if current["hash"] == entry["hash"]:
        return None
    if current["size"] != entry["size"]:
        return f"changed size ({entry['size']} -> {current['size']} bytes)"
    return "changed content"


def output_holds(out: Path, key: str, overwrite: bool, what: str) -> bool:
    """Whether ``out`` holds the finished directory with ``key`` already (then there is nothing
    to do); ``False`` when it is free to write, or holds another one and ``overwrite`` is set.

    Args:
        out: the ``--out`` directory.
        key: the key of the directory to write.
        overwrite: whether another finished directory there may be replaced.
        what: what is written, for messages (``prepared dataset``, ``teacher cache``).

    Raises:
        ValueError: ``out`` holds another finished directory (without ``overwrite``), or files
            that are none.
    """
    if (out / MANIFEST).is_file():
        if json.loads((out / MANIFEST).read_text()).get("key") == key:
            return True
        if not overwrite:
            raise ValueError(f"--out {out} holds a {what} made from other sources or settings; "
                             "give another --out, or --overwrite true to replace it")  # fmt: skip
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not a {what}; give an empty or new "
                         "directory")  # fmt: skip
    return False


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` into ``path`` (atomically: a reader never sees half of it)."""
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path / MANIFEST)
