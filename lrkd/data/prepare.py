"""``lrkd prepare``: records tokenised with the teacher's tokenizer, packed and written as a
memory-mapped Hugging Face ``datasets`` directory with a manifest.

The steps, each a ``datasets`` operation over Arrow files on disk (so memory does not grow with
the corpus):

1. **read**: :func:`lrkd.data.records.located_records` over the sources
   (``Dataset.from_generator``, files shared out to the processes);
2. **split**: the validation hold-out, a seeded shuffle of the records (as earlier lrkd versions
   did in memory, so the same corpus gives the same blocks);
3. **tokenise**: ``map(batched=True, num_proc=N)``;
4. **pack**: text into blocks of ``seq_length`` (one pass in order, carrying the remainder from
   batch to batch, so the blocks do not depend on the number of processes); prompt+response
   records into examples, overlong ones handled by ``overlong``;
5. **save**: ``save_to_disk`` per split into a staging directory, then ``manifest.json``, then one
   rename into place. An interrupted prepare leaves only a staging directory (``.NAME.partial-*``,
   removed by the next prepare); a finished one is never redone.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lrkd.data.checks import check_at_least, check_choice, check_fraction
from lrkd.data.corpus import builtin_corpus
from lrkd.data.manifest import (
    FORMAT,
    MANIFEST,
    PACK_MODES,
    PrepareSettings,
    output_holds,
    read_manifest,
    source_entry,
    tokenizer_fingerprint,
    write_manifest,
)
from lrkd.data.overlong import OVERLONG_MODES, fit_row, keep_rows, warn_long_rows
from lrkd.data.records import expand_sources, located_records
from lrkd.data.tokens import prompt_token_ids, response_token_ids

log = logging.getLogger("lrkd")

__all__ = ["cache_key", "check_settings", "default_workers", "prepare", "prepared_path"]

#: Documents per batch of the tokenising and packing maps.
BATCH = 1000
#: Inputs smaller than this are prepared in one process (starting workers costs more).
SMALL_INPUT_BYTES = 32 << 20


def check_settings(settings: PrepareSettings, prefix: str = "data.") -> None:
    """Refuse settings out of range, naming the field (``prefix`` + its name)."""
    check_at_least(f"{prefix}seq_length", settings.seq_length, 2)
    check_fraction(f"{prefix}val_fraction", settings.val_fraction)
    check_at_least(f"{prefix}builtin_documents", settings.builtin_documents, 1)
    check_choice(f"{prefix}overlong", settings.overlong, OVERLONG_MODES)
    check_choice(f"{prefix}pack", settings.pack, PACK_MODES)


def default_workers(sources: list[Path]) -> int:
    """Processes for preparing ``sources``: one for small inputs, else every CPU of this
    process (at most 16)."""
    size = sum(p.stat().st_size for p in sources if p.is_file())
    if size < SMALL_INPUT_BYTES:
        return 1
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))  # fmt: skip


def _sources(train_files: list[str] | None, val_files: list[str] | None) -> dict[str, list[Path]]:
    sources = {"train": [] if train_files is None else expand_sources(train_files)}
    if val_files is not None:
        sources["val"] = expand_sources(val_files, "data.val_files")
    return sources


def cache_key(
    entries: dict[str, list[dict[str, Any]]], tokenizer: Any, settings: PrepareSettings
) -> str:
    """The key of a prepared dataset in the cache: the sources' contents, the tokenizer and the
    settings (the built-in corpus's size only when it is used)."""
    import xxhash

    chosen = asdict(settings)
    if entries["train"]:
        chosen.pop("builtin_documents")
    content = {split: [entry["hash"] for entry in split_entries]
               for split, split_entries in entries.items()}  # fmt: skip
    key = repr((FORMAT, content, tokenizer_fingerprint(tokenizer), sorted(chosen.items())))
    return xxhash.xxh3_128(key.encode()).hexdigest()[:24]


def prepared_path(
    train_files: list[str] | None, val_files: list[str] | None, tokenizer: Any,
    settings: PrepareSettings, root: Path,
) -> tuple[Path, dict[str, list[dict[str, Any]]]]:  # fmt: skip
    """The cache directory under ``root`` that holds these files prepared with this tokenizer
    and these settings, and the sources' manifest entries."""
    entries = {split: [source_entry(p) for p in paths]
               for split, paths in _sources(train_files, val_files).items()}  # fmt: skip
    return root / cache_key(entries, tokenizer, settings), entries


def prepare(
    train_files: list[str] | None,
    out: str | Path,
    tokenizer: Any,
    settings: PrepareSettings,
    val_files: list[str] | None = None,
    tokenizer_name: str | None = None,
    num_proc: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Prepare records for training: tokenise, pack and save them with a manifest at ``out``.

    Args:
        train_files: record sources (see :mod:`lrkd.data.records`); ``None`` is the built-in
            corpus.
        out: the prepared directory to write.
        tokenizer: the teacher's tokenizer.
        settings: packing, splitting and field settings.
        val_files: validation sources; ``None`` holds out ``settings.val_fraction`` of the
            training records.
        tokenizer_name: the tokenizer's name, recorded in the manifest.
        num_proc: processes for reading and tokenising (``None``: :func:`default_workers`).
        overwrite: replace an existing prepared directory made from other sources or settings.

    Returns:
        ``out``. An ``out`` that holds this preparation already is returned as it is.

    Raises:
        ValueError: malformed records (naming file and line), mixed record kinds, overlong
            records under ``overlong="error"``, too little text for one block, or an ``out``
            that holds something else (without ``overwrite``).
    """
    check_settings(settings)
    out = Path(out).expanduser()
    sources = _sources(train_files, val_files)
    entries = {split: [source_entry(p) for p in paths] for split, paths in sources.items()}
    key = cache_key(entries, tokenizer, settings)
    if output_holds(out, key, overwrite, "prepared dataset"):
        log.info("lrkd prepare: %s is prepared already (same sources and settings)", out)
        return out
    _remove_stale_staging(out)
    workers = num_proc or default_workers([p for paths in sources.values() for p in paths])
    staging = out.parent / f".{out.name}.partial-{socket.gethostname()}-{os.getpid()}"
    staging.mkdir(parents=True)
    start = time.perf_counter()
    notes = _Notes()
    log.addHandler(notes)
    try:
        manifest = _prepare_into(staging, sources, tokenizer, settings, workers)
        inputs = {"train": _absolute(train_files), "val": _absolute(val_files)}
        manifest.update(
            format=FORMAT, key=key, inputs=inputs, sources=entries, num_proc=workers,
            seconds=round(time.perf_counter() - start, 2), warnings=notes.messages,
            tokenizer={"name": tokenizer_name or getattr(tokenizer, "name_or_path", "") or "",
                       "fingerprint": tokenizer_fingerprint(tokenizer),
                       "vocab_size": len(tokenizer)},
        )  # fmt: skip
        shutil.rmtree(staging / "cache", ignore_errors=True)
        write_manifest(staging, manifest)
        _move_into_place(staging, out, key)
    finally:
        log.removeHandler(notes)
        shutil.rmtree(staging, ignore_errors=True)
    _log_summary(out, manifest)
    return out


class _Notes(logging.Handler):
    """Collects the warnings of a prepare (overlong or cut records), which the manifest keeps so
    that every run on the prepared data repeats them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _remove_stale_staging(out: Path) -> None:
    """Remove this host's staging directories of ``out`` left by interrupted prepares (one
    named with this process's id too: a restarted container may reuse the id of a killed one)."""
    host = socket.gethostname()
    for stale in out.parent.glob(f".{out.name}.partial-{host}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(staging: Path, out: Path, key: str) -> None:
    """Rename the finished staging directory to ``out``; if another process finished the same
    preparation first, keep theirs."""
    if out.exists():
        if (out / MANIFEST).is_file() and read_manifest(out).get("key") == key:
            return
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(staging, out)
    except OSError:  # another process renamed its copy into place in between
        if not (out / MANIFEST).is_file():
            raise


def _log_summary(out: Path, manifest: dict[str, Any]) -> None:
    for split, stats in manifest["splits"].items():
        log.warning(
            "lrkd prepare: %s %s: %d records -> %d examples, %d tokens (%d targets)",
            out, split, stats["records"], stats["examples"], stats["tokens"],
            stats["target_tokens"],
        )  # fmt: skip
    log.warning("lrkd prepare: wrote %s in %.1f s with %d processes", out, manifest["seconds"],
                manifest["num_proc"])  # fmt: skip


# ------------------------------------------------------------------------------------ pipeline


def _prepare_into(
    staging: Path, sources: dict[str, list[Path]], tokenizer: Any, settings: PrepareSettings,
    workers: int,
) -> dict[str, Any]:  # fmt: skip
    """Write each split's dataset into ``staging``; return the manifest's kind, splits and
    settings."""
    records = {split: _read(paths, settings, staging / "cache", workers, split)
               for split, paths in sources.items()}  # fmt: skip
    if not len(records["train"]):
        raise ValueError(f"data.train_files {[str(p) for p in sources['train']]} hold no records")
    kind = _kind(records)
    if "val" not in records:
        records["train"], records["val"] = _hold_out(records["train"], settings)
    token_type = "uint16" if len(tokenizer) <= 1 << 16 else "int32"
    if kind == "text":
        prepared = {split: _pack_text(ds, split, tokenizer, settings, token_type, workers)
                    for split, ds in records.items() if len(ds)}  # fmt: skip
    else:
        # (datasets' map leaves an empty split without the new columns: no val split then)
        prepared = _fit_examples({split: ds for split, ds in records.items() if len(ds)},
                                 tokenizer, settings, token_type, workers)  # fmt: skip
    splits = {}
    for split, ds in prepared.items():
        if not len(ds) and kind == "text":
            if split == "train":
                raise ValueError(
                    f"the training text has fewer tokens than one block of seq_length="
                    f"{settings.seq_length}; give more text or a shorter data.seq_length"
                )
            log.warning(
                "lrkd prepare: the validation text has fewer tokens than one block of "
                "seq_length=%d; there is no validation",
                settings.seq_length,
            )
        ds.save_to_disk(str(staging / split))
        splits[split] = {"records": len(records[split]), **_token_counts(ds)}
    return {"kind": kind, "settings": asdict(settings), "splits": splits,
            "token_type": token_type}  # fmt: skip


def _read(paths: list[Path], settings: PrepareSettings, cache: Path, workers: int, split: str):
    """The records of ``paths`` (the built-in corpus for none) as a dataset of ``where``,
    ``text``, ``prompt`` and ``response`` (``None`` where a record has no such field)."""
    from datasets import Dataset, Features, Value
    from datasets.exceptions import DatasetGenerationError

    features = Features({name: Value("string") for name in ("where", "text", "prompt", "response")})
    if not paths:
        builtin = (settings.builtin_documents, settings.seed)
        kwargs: dict[str, Any] = {"files": [], "fields": settings.fields, "builtin": builtin}
    else:
        kwargs = {"files": [str(p) for p in paths], "fields": settings.fields, "builtin": None}
    processes = min(workers, len(paths)) if len(paths) > 1 else None
    try:
        return Dataset.from_generator(
            _generate_records, features=features, gen_kwargs=kwargs, cache_dir=str(cache),
            num_proc=processes, split=split,
        )  # fmt: skip
    except DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, (ValueError, OSError)):  # a malformed record, named by our reader
            raise cause from None
        if processes:  # a worker's error comes back as text only: read again here to name it
            try:
                for _ in _generate_records(**kwargs):
                    pass
            except (ValueError, OSError) as found:
                raise found from None
        raise


def _generate_records(
    files: list[str], fields: dict[str, str], builtin: tuple[int, int] | None
) -> Iterator[dict[str, str | None]]:
    if builtin is not None:
        for doc in builtin_corpus(*builtin):
            yield {"where": "the built-in corpus", "text": doc, "prompt": None, "response": None}
    for file in files:
        for where, record in located_records(file, **fields):
            yield {"where": where, "text": record.get("text"), "prompt": record.get("prompt"),
                   "response": record.get("response")}  # fmt: skip


def _kind(records: dict[str, Any]) -> str:
    """``text`` or ``prompt_response``, the one kind of record of all splits.

    Raises:
        ValueError: the files mix both kinds, naming a record of each.
    """
    import pyarrow.compute as pc

    first: dict[str, str] = {}
    for ds in records.values():
        if not len(ds):
            continue
        for kind, column in (("text", "text"), ("prompt_response", "prompt")):
            index = pc.index(pc.is_valid(ds.data.column(column)), True).as_py()
            if index >= 0 and kind not in first:
                first[kind] = ds.data.column("where")[index].as_py()
    if len(first) > 1:
        raise ValueError(
            "data: the files mix plain-text records and prompt+response records: "
            f"{first['text']}, {first['prompt_response']}; give one kind per DataModule"
        )
    return next(iter(first))


def _hold_out(ds, settings: PrepareSettings):
    """Training and validation records: a seeded shuffle of the records, the first
    ``val_fraction`` of them held out."""
    order = list(range(len(ds)))
    random.Random(settings.seed).shuffle(order)
    n_val = max(1, int(len(order) * settings.val_fraction)) if settings.val_fraction else 0
    if n_val >= len(order):
        raise ValueError(
            f"data.val_fraction={settings.val_fraction} holds out all {n_val} records of "
            "data.train_files; give more records, data.val_files or val_fraction 0"
        )
    return ds.select(order[n_val:]), ds.select(order[:n_val])


def _tokenize_text(batch: dict[str, list], tokenizer: Any) -> dict[str, list[list[int]]]:
    eos = tokenizer.eos_token_id
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"ids": [[*doc, eos] for doc in ids]}


def _pack_text(
    ds, split: str, tokenizer: Any, settings: PrepareSettings, token_type: str, workers: int
):
    """Blocks of tokens: documents closed by EOS, then concatenated and cut into full blocks of
    ``seq_length`` (``pack="concat"``), or each cut alone into blocks of at most ``seq_length``
    (``pack="documents"``; pieces of one token, which predict nothing, are left out)."""
    from datasets import Features, List, Value

    tokens = ds.map(
        _tokenize_text, batched=True, batch_size=BATCH, fn_kwargs={"tokenizer": tokenizer},
        remove_columns=ds.column_names, features=Features({"ids": List(Value(token_type))}),
        num_proc=workers if workers > 1 and len(ds) >= workers * BATCH else None,
        desc=f"lrkd prepare: tokenising {split}",
    )  # fmt: skip
    if settings.pack == "documents":
        return tokens.map(
            _cut_documents, batched=True, batch_size=BATCH, remove_columns=["ids"],
            fn_kwargs={"length": settings.seq_length},
            features=Features({"input_ids": List(Value(token_type))}),
            desc=f"lrkd prepare: cutting {split} documents",
        )  # fmt: skip
    return tokens.with_format("arrow").map(
        _ConcatPacker(settings.seq_length), batched=True, batch_size=BATCH,
        remove_columns=["ids"], load_from_cache_file=False,
        features=Features({"input_ids": List(Value(token_type), length=settings.seq_length)}),
        desc=f"lrkd prepare: packing {split} into blocks of {settings.seq_length}",
    )  # fmt: skip


class _ConcatPacker:
    """Cuts the concatenated tokens of consecutive batches into full blocks, carrying the
    remainder of one batch into the next (the map runs in one process, in order)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.carry: np.ndarray | None = None

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        flat = table.column("ids").combine_chunks().flatten().to_numpy()
        if self.carry is not None:
            flat = np.concatenate([self.carry, flat])
        n = len(flat) // self.length * self.length
        self.carry = flat[n:]
        return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(flat[:n]),
                                                                        self.length)})  # fmt: skip


def _cut_documents(batch: dict[str, list], length: int) -> dict[str, list[list[int]]]:
    pieces = [doc[i : i + length] for doc in batch["ids"] for i in range(0, len(doc), length)]
    return {"input_ids": [piece for piece in pieces if len(piece) > 1]}


def _tokenize_pairs(batch: dict[str, list], tokenizer: Any, chat_template: bool) -> dict:
    return {
        "prompt_ids": [prompt_token_ids(tokenizer, p, chat_template) for p in batch["prompt"]],
        "response_ids": [response_token_ids(tokenizer, r) for r in batch["response"]],
    }


def _fit_examples(
    records: dict[str, Any], tokenizer: Any, settings: PrepareSettings, token_type: str,
    workers: int,
) -> dict[str, Any]:  # fmt: skip
    """Prompt+response examples of every split: ``input_ids`` (prompt then response, at most
    ``seq_length``) and ``prompt_length`` (the tokens before the first target); rows whose
    prompt leaves no room for a response token are refused, dropped or left-truncated by
    ``overlong`` over all splits together."""
    import pyarrow.compute as pc
    from datasets import Features, List, Value

    rows = {}
    for split, ds in records.items():
        rows[split] = ds.map(
            _tokenize_pairs, batched=True, batch_size=BATCH,
            fn_kwargs={"tokenizer": tokenizer, "chat_template": settings.chat_template},
            remove_columns=["text", "prompt", "response"],
            features=Features({"where": Value("string"), "prompt_ids": List(Value(token_type)),
                               "response_ids": List(Value(token_type))}),
            num_proc=workers if workers > 1 and len(ds) >= workers * BATCH else None,
            desc=f"lrkd prepare: tokenising {split}",
        )  # fmt: skip

    def lengths(ds, column: str) -> list[int]:
        return pc.list_value_length(ds.with_format("arrow")[:][column]).to_pylist()

    prompt_lengths = {split: lengths(ds, "prompt_ids") for split, ds in rows.items()}
    keep = keep_rows(
        prompt_lengths, {split: ds["where"] for split, ds in rows.items()},
        settings.seq_length, settings.overlong, "records",
        {split: [p + r for p, r in zip(prompt_lengths[split], lengths(ds, "response_ids"),
                                       strict=True)]
         for split, ds in rows.items()},
    )  # fmt: skip
    kept = {split: rows[split] if len(keep[split]) == len(rows[split])
            else rows[split].select(keep[split]) for split in rows}  # fmt: skip
    warn_long_rows(
        [(p, r) for ds in kept.values()
         for p, r in zip(lengths(ds, "prompt_ids"), lengths(ds, "response_ids"), strict=True)],
        settings.seq_length, settings.overlong, "records",
    )  # fmt: skip
    features = Features({"input_ids": List(Value(token_type)), "prompt_length": Value("int32")})
    examples = {}
    for split, ds in kept.items():
        examples[split] = ds.map(
            _fit_pairs, batched=True, batch_size=BATCH, remove_columns=ds.column_names,
            fn_kwargs={"length": settings.seq_length, "overlong": settings.overlong},
            features=features,
            desc=f"lrkd prepare: fitting {split} examples to {settings.seq_length} tokens",
        )  # fmt: skip
    return examples


def _fit_pairs(batch: dict[str, list], length: int, overlong: str) -> dict[str, list]:
    fitted = [fit_row(p, r, length, overlong)
              for p, r in zip(batch["prompt_ids"], batch["response_ids"], strict=True)]  # fmt: skip
    return {"input_ids": [[*p, *r][:length] for p, r in fitted],
            "prompt_length": [len(p) for p, _ in fitted]}  # fmt: skip


def _token_counts(ds) -> dict[str, int]:
    """Examples, tokens and target tokens (tokens at or after the prompt) of a split."""
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    lengths = pc.list_value_length(table["input_ids"])
    tokens = int(pc.sum(lengths).as_py() or 0)
    targets = tokens
    if "prompt_length" in table.column_names:
        cut = pc.min_element_wise(table["prompt_length"], lengths)
        targets = tokens - int(pc.sum(cut).as_py() or 0)
    return {"examples": len(ds), "tokens": tokens, "target_tokens": targets}


# ------------------------------------------------------------------------------------- command


def prepare_command(
    out: str | None = None,
    train_files: list[str] | str | None = None,
    val_files: list[str] | str | None = None,
    tokenizer: str | None = None,
    seq_length: int | None = None,
    pack: str | None = None,
    chat_template: bool | None = None,
    overlong: str | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    text_field: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    builtin_documents: int | None = None,
    fit_config: str | None = None,
    like: str | None = None,
    num_proc: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Tokenise, pack and save records for ``lrkd fit`` (``data.prepared: OUT``).

    Every option left out takes its value from ``--like`` (a prepared directory's manifest) or
    ``--fit_config`` (the ``data:`` section of a ``lrkd fit`` config, its tokenizer from
    ``model.teacher``), else the TextDataModule's default.

    Args:
        out: the prepared directory to write (new or empty; a finished one with the same sources
            and settings is left as it is). Default with ``--like``: that directory, replaced.
        train_files: ``.txt``, ``.jsonl``/``.json``, ``.parquet`` or ``.arrow`` files,
            directories of them or saved ``datasets`` directories (several as a list,
            ``'[a.jsonl, b.jsonl]'``); none: the built-in corpus.
        val_files: validation sources; none holds out ``val_fraction`` of the training records.
        tokenizer: the teacher's tokenizer: a built-in name, local directory or hub id.
        seq_length: tokens per block (must equal the run's ``data.seq_length``; default 256).
        pack: ``concat`` (documents joined with EOS, full blocks) or ``documents`` (no block
            mixes documents; pieces right-padded).
        chat_template: format prompts with the tokenizer's chat template (default true).
        overlong: prompt+response records whose prompt fills ``seq_length``: ``error``,
            ``drop``, ``truncate_left`` or ``keep``.
        val_fraction: share of records held out for validation (default 0.05).
        seed: seed of the hold-out and of the built-in corpus (default 0).
        text_field: the field holding plain text (default ``text``).
        prompt_field: the field holding a prompt (default ``prompt``).
        response_field: the field holding a response (default ``response``).
        builtin_documents: generated documents when no files are given (default 2000).
        fit_config: a ``lrkd fit`` YAML config whose ``data:`` section gives the defaults.
        like: a prepared directory whose sources and settings give the defaults (to prepare
            it again, e.g. with another tokenizer or ``seq_length``).
        num_proc: processes (default: one for inputs under 32 MB, else every CPU, at most 16).
        overwrite: replace an ``out`` prepared from other sources or settings.

    Returns:
        The prepared directory.
    """
    given = {"train_files": train_files, "val_files": val_files, "tokenizer": tokenizer,
             "seq_length": seq_length, "pack": pack, "chat_template": chat_template,
             "overlong": overlong, "val_fraction": val_fraction, "seed": seed,
             "text_field": text_field, "prompt_field": prompt_field,
             "response_field": response_field, "builtin_documents": builtin_documents}  # fmt: skip
    for key in ("train_files", "val_files"):
        if isinstance(given[key], str):
            given[key] = [given[key]]
    base = _fit_config_data(Path(fit_config)) if fit_config else {}
    if like is not None:
        base = {**base, **_manifest_options(Path(like))}
        out = out or like
        overwrite = overwrite or Path(out).resolve() == Path(like).resolve()
    if out is None:
        raise ValueError("--out is not set: give the directory to write the prepared data to")
    chosen = {**base, **{k: v for k, v in given.items() if v is not None}}
    names = set(PrepareSettings.__dataclass_fields__)
    settings = PrepareSettings(**{k: v for k, v in chosen.items() if k in names})
    check_settings(settings, prefix="--")
    if chosen.get("tokenizer") is None:
        raise ValueError(
            "--tokenizer is not set: give the teacher's tokenizer (a built-in name, local "
            "directory or hub id), or --fit_config with model.teacher"
        )
    from lrkd.data.tokens import resolve_tokenizer

    tok = resolve_tokenizer(chosen["tokenizer"])
    return prepare(
        chosen.get("train_files"), out, tok, settings, val_files=chosen.get("val_files"),
        tokenizer_name=chosen["tokenizer"], num_proc=num_proc, overwrite=overwrite,
    )  # fmt: skip


def _manifest_options(path: Path) -> dict[str, Any]:
    """The prepare options that made the prepared directory ``path``."""
    import json

    if not (path / MANIFEST).is_file():
        read_manifest(path)  # raises, saying how to prepare it
    manifest = json.loads((path / MANIFEST).read_text())
    options = {**manifest["settings"], "tokenizer": manifest["tokenizer"]["name"] or None}
    listed = {split: [e["path"] for e in entries] for split, entries in manifest["sources"].items()}
    for split, given in manifest.get("inputs", listed).items():  # a directory is listed afresh
        if given:
            options[f"{split}_files"] = given
    return options


def _absolute(paths: list[str] | None) -> list[str] | None:
    """``paths`` as absolute paths (URLs as they are), for the manifest."""
    if paths is None:
        return None
    return [p if "://" in p else str(Path(p).expanduser().resolve()) for p in paths]


def _fit_config_data(path: Path) -> dict[str, Any]:
    """The prepare options of a ``lrkd fit`` config: its ``data.init_args`` (or ``data``), the
    tokenizer defaulting to ``model.teacher`` (when it names one)."""
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    data = config.get("data") or {}
    data = data.get("init_args", data) if isinstance(data, dict) else {}
    if data.get("prepared"):
        raise ValueError(f"--fit_config {path}: its data.prepared is set already "
                         f"({data['prepared']}); nothing to prepare")  # fmt: skip
    teacher = (config.get("model") or {}).get("init_args", config.get("model") or {})
    if data.get("tokenizer") is None and isinstance(teacher.get("teacher"), str):
        data = {**data, "tokenizer": teacher["teacher"]}
    return data
