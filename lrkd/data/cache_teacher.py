"""``lrkd cache-teacher``: run the teacher once over a prepared dataset and store, per target
position, its top-k next tokens, their log-probabilities and the mass of the rest (the format
of :mod:`lrkd.data.teacher_cache`), so that students train from it without the teacher.

The work is cut into *pieces*: ``examples_per_piece`` consecutive examples of one split. Each
piece is computed and saved on its own into a staging directory next to ``out``
(``.<name>.partial``, the same for every process and every rerun), so that

- a rerun after an interruption computes only the pieces that are missing (**resumable**);
- several processes share the pieces (**shardable**: process ``shard`` of ``num_shards`` takes
  the pieces whose ordinal, counted over all splits, is ``shard`` modulo ``num_shards``; by
  default ``RANK`` and ``WORLD_SIZE`` of a ``torchrun`` launch), on one machine or several
  sharing a file system.

The process that finds every piece present assembles the cache: the pieces of each split
concatenated, the teacher's config and tokenizer (never its weights) in ``teacher/``, then the
manifest, and one rename into place. The others log how many pieces remain and return.

The staging directory's ``key.json`` names the cache it builds (and the piece size); one made
for another cache is removed and started afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lrkd.data.checks import check_at_least, check_choice
from lrkd.data.manifest import (
    MANIFEST,
    output_holds,
    read_manifest,
    tokenizer_fingerprint,
    write_manifest,
)
from lrkd.data.prepare import _move_into_place
from lrkd.data.teacher_cache import (
    COLUMNS,
    LOGPROB_DTYPES,
    TEACHER_DIR,
    TeacherCacheInfo,
    target_positions,
)
from lrkd.data.tokens import pad_collate
from lrkd.hardware import auto_teacher_dtype
from lrkd.models.paired_forward import final_hidden, final_norm
from lrkd.models.students import model_logits, output_vocab_size
from lrkd.models.teachers import TEACHER_DTYPES, load_teacher, load_tokenizer, resolve_model_path
from lrkd.models.zoo import is_builtin

log = logging.getLogger("lrkd")

__all__ = [
    "cache_key",
    "cache_teacher",
    "cache_teacher_command",
    "teacher_fingerprint",
    "top_k_logprobs",
]

#: The layout version of the pieces and of the cache key; a change starts staging afresh.
CACHE_FORMAT = 1
#: Logits computed at once on the way to the top-k (rows x vocabulary; 128 MiB of float32).
CHUNK_LOGITS = 1 << 25
#: Examples per Arrow chunk of a piece's cache columns (keeps list offsets far below 2**31).
ARROW_CHUNK = 64
#: File names in the staging directory and in each piece.
KEY_FILE = "key.json"
PIECE_FILE = "piece.json"
PIECES = "pieces"
#: Suffixes of the weight files whose names and sizes enter a teacher directory's fingerprint.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_SAMPLE_BYTES = 1 << 16


# ---------------------------------------------------------------------------- the computation


def top_k_logprobs(
    rows: torch.Tensor,
    head: torch.Tensor | None,
    top_k: int,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k next tokens of some positions, their log-probabilities and the tail's.

    The logits are made for ``chunk_rows`` positions at a time, so that a long batch never holds
    float32 logits for all of its positions.

    Args:
        rows: final normed hidden states [N, d] (with ``head``) or logits [N, V].
        head: the LM head's weight [V, d] (``hidden @ head.T`` in their dtype gives the logits),
            or ``None`` when ``rows`` are logits.
        top_k: tokens kept per position (at most V).
        temperature: the logits are divided by it before the softmax.
        chunk_rows: positions per chunk (default: :data:`CHUNK_LOGITS` logits per chunk).

    Returns:
        ``ids`` [N, k] (int64, most likely first), ``logprobs`` [N, k] (float32, the
        log-softmax over all V logits) and ``tail`` [N] (float32, the log of the probability
        outside the top-k: ``-inf`` when k = V).
    """
    vocab = head.shape[0] if head is not None else rows.shape[-1]
    chunk = chunk_rows or max(1, CHUNK_LOGITS // vocab)
    ids, logprobs, tails = [], [], []
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        logits = (part @ head.T if head is not None else part).float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        del logits
        values, indices = logp.topk(top_k, dim=-1, sorted=True)
        tails.append(logp.scatter_(-1, indices, -math.inf).logsumexp(dim=-1))
        ids.append(indices)
        logprobs.append(values)
    if not ids:
        empty = rows.new_zeros((0, top_k), dtype=torch.float32)
        return empty.long(), empty, empty[:, 0]
    return torch.cat(ids), torch.cat(logprobs), torch.cat(tails)


def _teacher_rows(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    spans: list[range],
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The rows from which the target positions' logits come: final hidden states and the head
    (no full logits made) where the model allows it, else the logits themselves."""
    if final_norm(model) is not None:
        out = final_hidden(model, input_ids, attention_mask)
        head = model.get_output_embeddings().weight
    else:
        out, head = model_logits(model, input_ids, attention_mask), None
    rows = torch.cat([out[j, span.start : span.stop] for j, span in enumerate(spans)])
    return rows, head


@dataclass(frozen=True)
class _Settings:
    """How the teacher's outputs are turned into cache columns."""

    top_k: int
    temperature: float
    logprob_dtype: str
    batch_size: int
    pad_token_id: int
    vocab_size: int = 0


def _compute_piece(model: nn.Module, table: Any, settings: _Settings, device: torch.device,
                   progress: Any) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The cache columns of one piece's examples (``table``: the prepared rows), added to the
    prepared columns; and the piece's statistics."""
    import pyarrow.compute as pc

    lengths, spans = _spans(table)
    flat = pc.list_flatten(table.column("input_ids")).to_numpy(zero_copy_only=False)
    flat = flat.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    # Similar lengths batched together: less padding (each example's values do not depend on
    # the others in its batch beyond float rounding).
    order = [i for i in np.argsort(-lengths, kind="stable") if len(spans[i])]
    results: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(spans)
    vocab = 0
    for first in range(0, len(order), settings.batch_size):
        batch = order[first : first + settings.batch_size]
        examples = [{"input_ids": torch.from_numpy(flat[starts[i] : starts[i + 1]]),
                     "attention_mask": torch.ones(int(lengths[i]), dtype=torch.long)}
                    for i in batch]  # fmt: skip
        padded = pad_collate(examples, settings.pad_token_id)
        rows, head = _teacher_rows(
            model, padded["input_ids"].to(device), padded["attention_mask"].to(device),
            [spans[i] for i in batch],
        )  # fmt: skip
        vocab = head.shape[0] if head is not None else rows.shape[-1]
        ids, logprobs, tail = top_k_logprobs(rows, head, settings.top_k, settings.temperature)
        ids, logprobs, tail = ids.cpu().numpy(), logprobs.cpu().numpy(), tail.cpu().numpy()
        at = 0
        for i in batch:
            n = len(spans[i])
            results[i] = (ids[at : at + n], logprobs[at : at + n], tail[at : at + n])
            at += n
        progress.update(at)
    if vocab and vocab != settings.vocab_size:
        raise RuntimeError(f"the teacher produced {vocab} logits per position, its head or "
                           f"config says {settings.vocab_size}")  # fmt: skip
    columns = _cache_columns(results, settings)
    for name in COLUMNS:
        table = table.append_column(name, columns[name])
    stats = {"examples": len(spans), "target_tokens": int(sum(len(s) for s in spans)),
             "vocab_size": settings.vocab_size}  # fmt: skip
    return table, stats


def _spans(table: Any) -> tuple[np.ndarray, list[range]]:
    """The lengths of a table's examples and their target positions."""
    import pyarrow.compute as pc

    column = table.column("input_ids")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    prompts = (table.column("prompt_length").to_numpy().astype(np.int64)
               if "prompt_length" in table.column_names else np.zeros_like(lengths))  # fmt: skip
    return lengths, [target_positions(int(n), int(p)) for n, p in zip(lengths, prompts,
                                                                      strict=True)]  # fmt: skip


def _cache_columns(results: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None],
                   settings: _Settings) -> dict[str, Any]:  # fmt: skip
    """The three cache columns of a piece as chunked Arrow list arrays, examples in order (an
    example without targets holds empty lists)."""
    import pyarrow as pa

    k = settings.top_k
    types = (np.dtype(_id_type(settings.vocab_size)), np.dtype(settings.logprob_dtype),
             np.dtype(settings.logprob_dtype))  # fmt: skip
    chunks: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for first in range(0, max(len(results), 1), ARROW_CHUNK):
        part = results[first : first + ARROW_CHUNK]
        present = [r for r in part if r is not None]
        counts = [0 if r is None else len(r[2]) for r in part]
        targets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        for column, (name, dtype) in enumerate(zip(COLUMNS, types, strict=True)):
            values = (np.concatenate([r[column].reshape(-1) for r in present]) if present
                      else np.zeros(0))  # fmt: skip
            width = 1 if name == "tail_logprob" else k
            offsets = pa.array((targets * width).astype(np.int32))
            chunks[name].append(pa.ListArray.from_arrays(offsets, pa.array(values.astype(dtype))))
    return {name: pa.chunked_array(arrays) for name, arrays in chunks.items()}


def _id_type(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def _features(prepared_features: Any, id_type: str, logprob_dtype: str) -> Any:
    """The cache's ``datasets`` features: the prepared columns' and the three cache columns."""
    from datasets import Features, List, Value

    return Features({
        **prepared_features,
        "topk_ids": List(Value(id_type)),
        "topk_logprobs": List(Value(logprob_dtype)),
        "tail_logprob": List(Value(logprob_dtype)),
    })  # fmt: skip


# ------------------------------------------------------------------------------- the teacher


@dataclass
class _Teacher:
    """The teacher as far as the cache needs it: loaded only when a piece is to be computed.

    Attributes:
        name: the teacher as given (for the manifest and messages).
        tokenizer: its tokenizer.
        dtype: the dtype it runs in.
        fingerprint: see :func:`teacher_fingerprint`.
        config: its Hugging Face config.
        vocab_size: logits per position (the config's until the model is loaded).
        source: the directory or hub id to load from (``None``: ``module`` was given).
        module: the model, once loaded (or as given).
    """

    name: str
    tokenizer: Any
    dtype: torch.dtype
    fingerprint: str
    config: Any
    vocab_size: int
    source: str | None = None
    module: nn.Module | None = field(default=None, repr=False)

    def model(self, device: torch.device) -> nn.Module:
        """The model on ``device`` in eval mode (loaded the first time)."""
        if self.module is None:
            self.module = load_teacher(self.source, dtype=self.dtype, field="--teacher")
        self.module.eval().to(device)
        self.vocab_size = output_vocab_size(self.module) or self.vocab_size
        if not self.vocab_size:
            raise ValueError(
                f"--teacher {self.name}: its vocabulary size is unknown (no output "
                "embedding, no config.vocab_size); give a Hugging Face causal LM"
            )
        return self.module


def _config_vocab(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def _resolve_teacher(teacher: str | nn.Module, tokenizer: Any, teacher_dtype: str,
                     teacher_name: str | None) -> _Teacher:  # fmt: skip
    """The teacher's name, tokenizer, dtype, fingerprint and config, without loading the
    weights of a teacher given by name (a hub model's are downloaded, to fingerprint them)."""

    if isinstance(teacher, nn.Module):
        if tokenizer is None:
            raise ValueError("tokenizer: a teacher given as a module needs its tokenizer "
                             "(cache_teacher(..., tokenizer=TOKENIZER))")  # fmt: skip
        if teacher_dtype in TEACHER_DTYPES:
            teacher = teacher.to(TEACHER_DTYPES[teacher_dtype])
        dtype = next(teacher.parameters()).dtype
        config = getattr(teacher, "config", None)
        vocab = output_vocab_size(teacher) or 0
        if not vocab:
            raise ValueError("--teacher: the module has neither an output embedding "
                             "(get_output_embeddings) nor a config.vocab_size; give a Hugging "
                             "Face causal LM")  # fmt: skip
        name = teacher_name or getattr(teacher, "name_or_path", "") or ""
        return _Teacher(name=name, tokenizer=tokenizer, dtype=dtype,
                        fingerprint=teacher_fingerprint(teacher), config=config,
                        vocab_size=int(vocab), module=teacher)  # fmt: skip
    from transformers import AutoConfig

    source = resolve_model_path(teacher, field="--teacher")
    dtype = auto_teacher_dtype() if teacher_dtype == "auto" else TEACHER_DTYPES[teacher_dtype]
    if tokenizer is None:
        tokenizer = load_tokenizer(teacher, field="--teacher")
    config = AutoConfig.from_pretrained(source)
    found = _teacher_directory(source)
    if found is None:  # a hub model not downloaded yet: load it once so that it is
        module = load_teacher(source, dtype=dtype, field="--teacher")
        found = _teacher_directory(source)
    else:
        module = None
    fingerprint = teacher_fingerprint(found) if found else teacher_fingerprint(config)
    # A local directory is recorded absolute: the manifest is read from other directories.
    local = Path(source) if Path(source).is_dir() and not is_builtin(teacher) else None
    name = teacher_name or (str(local.resolve()) if local else teacher)
    return _Teacher(name=name, tokenizer=tokenizer, dtype=dtype,
                    fingerprint=fingerprint, config=config,
                    vocab_size=int(_config_vocab(config) or 0), source=source,
                    module=module)  # fmt: skip


def _teacher_directory(source: str) -> Path | None:
    """The local directory holding the teacher's files: ``source`` itself, or a hub model's
    snapshot in the Hugging Face cache (``None`` while its weights are not downloaded: the
    fingerprint must not change once they are)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
    except Exception:  # an id the hub library refuses: fingerprint the config alone
        return None
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    return snapshot if any(p.name.endswith(WEIGHT_SUFFIXES) for p in snapshot.iterdir()) else None


def teacher_fingerprint(teacher: str | Path | nn.Module | Any) -> str:
    """A hash that tells teachers apart, without reading all of their weights.

    Args:
        teacher: a model directory (its ``config.json`` content, and per weight file its name,
            size and four 64 KiB samples of its bytes, which tell fine-tunes of one model
            apart), an ``nn.Module`` (its config and, per parameter, its name, shape, dtype and
            first 4096 values), or a Hugging Face config alone.

    Returns:
        32 hex digits.
    """
    import xxhash

    digest = xxhash.xxh3_128()
    if isinstance(teacher, nn.Module):
        config = getattr(teacher, "config", None)
        digest.update(_config_json(config).encode() if config is not None else b"no config")
        for name, param in teacher.state_dict().items():
            digest.update(f"{name} {tuple(param.shape)} {param.dtype}".encode())
            sample = param.detach().reshape(-1)[:4096].float().cpu().numpy()
            digest.update(sample.tobytes())
        return digest.hexdigest()
    if not isinstance(teacher, (str, Path)):
        digest.update(_config_json(teacher).encode())
        return digest.hexdigest()
    directory = Path(teacher)
    digest.update((directory / "config.json").read_bytes())
    for file in sorted(p for p in directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        size = file.stat().st_size
        digest.update(f"{file.name} {size}".encode())
        with file.open("rb") as f:
            for at in (size // 4, size // 2, 3 * size // 4, max(size - _SAMPLE_BYTES, 0)):
                f.seek(at)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _config_json(config: Any) -> str:
    """A config's fields as sorted JSON, without those that name where it was read from."""
    fields_ = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for key in ("_name_or_path", "transformers_version", "_commit_hash"):
        fields_.pop(key, None)
    return json.dumps(fields_, sort_keys=True, default=str)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cache_key(
    prepared_key: str, fingerprint: str, dtype: str, temperature: float, top_k: int,
    logprob_dtype: str,
) -> str:  # fmt: skip
    """The key of a teacher cache: the prepared data's key, the teacher's fingerprint and dtype,
    the temperature, k and the storage type of the log-probabilities."""
    import xxhash

    chosen = (CACHE_FORMAT, prepared_key, fingerprint, dtype, float(temperature), int(top_k),
              logprob_dtype)  # fmt: skip
    return xxhash.xxh3_128(repr(chosen).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------- the pieces


@dataclass(frozen=True)
class _Piece:
    """``examples_per_piece`` consecutive examples of a split (the last one may hold fewer)."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


def _plan(sizes: dict[str, int], examples_per_piece: int) -> list[_Piece]:
    """Every piece of every split, in order (train first)."""
    return [_Piece(split, i, start, min(start + examples_per_piece, size))
            for split, size in sizes.items()
            for i, start in enumerate(range(0, size, examples_per_piece))]  # fmt: skip


def _done(pieces_dir: Path, piece: _Piece) -> bool:
    return (pieces_dir / piece.name / PIECE_FILE).is_file()


def _open_staging(out: Path, key: str, examples_per_piece: int) -> Path:
    """The staging directory of ``out`` for this cache: kept from an earlier run (or another
    shard) when it builds the same cache in the same pieces, else made afresh."""
    staging = out.parent / f".{out.name}.partial"
    wanted = {"key": key, "examples_per_piece": examples_per_piece, "format": CACHE_FORMAT}
    while True:
        if staging.is_dir():
            try:
                found = json.loads((staging / KEY_FILE).read_text())
            except (OSError, ValueError):
                found = None
            if found == wanted:
                return staging
            log.warning(
                "lrkd cache-teacher: %s holds the pieces of another cache (%s); removing it and "
                "starting afresh", staging,
                "other teacher, data or settings" if found else "no key.json",
            )  # fmt: skip
            shutil.rmtree(staging, ignore_errors=True)
        fresh = out.parent / f".{out.name}.partial-new-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(fresh, ignore_errors=True)
        (fresh / PIECES).mkdir(parents=True)
        (fresh / KEY_FILE).write_text(json.dumps(wanted, indent=2) + "\n")
        try:
            os.rename(fresh, staging)
        except OSError:  # another process made it in between: use theirs
            shutil.rmtree(fresh, ignore_errors=True)
        if staging.is_dir():
            return staging


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets``' progress bars off (a bar per small piece is noise), as they were after."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """The model's ``config.use_cache`` off (a forward over whole sequences needs no key/value
    cache, which would only take memory), as it was after."""
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    if before:
        config.use_cache = False
    try:
        yield
    finally:
        if before:
            config.use_cache = before


def _save_piece(table: Any, features: Any, stats: dict[str, Any], pieces_dir: Path,
                piece: _Piece) -> None:  # fmt: skip
    """Save a piece into a temporary directory, then rename it into place (a piece directory
    that exists is complete; its ``piece.json`` is written before the rename)."""
    from datasets import Dataset, DatasetInfo

    tmp = pieces_dir / f".{piece.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_datasets():
        Dataset(table, info=DatasetInfo(features=features)).save_to_disk(str(tmp))
    info = {**stats, "split": piece.split, "start": piece.start, "stop": piece.stop}
    (tmp / PIECE_FILE).write_text(json.dumps(info) + "\n")
    try:
        os.replace(tmp, pieces_dir / piece.name)
    except OSError:  # another process saved this piece first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------------------- the command


def _check_arguments(top_k: int, temperature: float, teacher_dtype: str, logprob_dtype: str,
                     batch_size: int, examples_per_piece: int) -> None:  # fmt: skip

    check_at_least("--top_k", top_k, 1)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):  # fmt: skip
        raise ValueError(f"--temperature must be a finite number above 0, got {temperature}")
    check_choice("--teacher_dtype", teacher_dtype, ("auto", *TEACHER_DTYPES))
    check_choice("--logprob_dtype", logprob_dtype, LOGPROB_DTYPES)
    check_at_least("--batch_size", batch_size, 1)
    check_at_least("--examples_per_piece", examples_per_piece, 1)


def _shards(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """This process's shard and the number of shards (default: ``RANK`` and ``WORLD_SIZE``)."""
    if num_shards is None:
        num_shards = int(os.environ.get("WORLD_SIZE", 1))
    if shard is None:
        shard = int(os.environ.get("RANK", 0))
    check_at_least("--num_shards", num_shards, 1)
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard must be in [0, {num_shards}) (--num_shards={num_shards}), "
                         f"got {shard}")  # fmt: skip
    return shard, num_shards


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def _read_prepared(prepared: Path) -> dict[str, Any]:
    """The prepared directory's manifest, refusing a teacher cache or a missing directory."""
    if not (prepared / MANIFEST).is_file():
        raise FileNotFoundError(
            f"--prepared {prepared} is not a prepared dataset (no {MANIFEST}); make one with: "
            f"lrkd prepare --train_files FILES --tokenizer TEACHER --out {prepared}"
        )
    manifest = read_manifest(prepared)
    made = manifest.get("teacher_cache")
    if made is not None:
        source = (made.get("prepared") or {}).get("path") or "the prepared directory"
        raise ValueError(
            f"--prepared {prepared} is a teacher cache (of {made.get('teacher')!r}), not "
            f"prepared data; give the prepared directory it was made from: {source}"
        )
    return manifest


def _holds(out: Path, key: str) -> bool:
    """Whether ``out`` is a finished directory (prepared data or a cache) with this key."""
    return (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()).get("key") == key


def _check_out(out: Path, prepared: Path, key: str, overwrite: bool) -> bool:
    """Whether ``out`` holds this cache already; refuse one that holds something else."""
    if out.resolve() == prepared.resolve():
        raise ValueError(f"--out {out} is the --prepared directory; give another directory")
    return output_holds(out, key, overwrite, "teacher cache")


def cache_teacher(
    prepared: str | Path,
    out: str | Path,
    teacher: str | nn.Module,
    *,
    tokenizer: Any = None,
    teacher_name: str | None = None,
    top_k: int = 32,
    temperature: float = 1.0,
    teacher_dtype: str = "auto",
    logprob_dtype: str = "float16",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    shard: int | None = None,
    num_shards: int | None = None,
    examples_per_piece: int = 512,
    overwrite: bool = False,
) -> Path:
    """Run the teacher over a prepared dataset and save its top-k log-probabilities at every
    target position as a teacher cache (:mod:`lrkd.data.teacher_cache`).

    Args:
        prepared: a prepared directory (``lrkd prepare``), tokenised with the teacher's
            tokenizer.
        out: the teacher cache to write (new or empty; one holding this cache already is
            returned as it is).
        teacher: a built-in name, local Hugging Face model directory or hub id; or a causal LM
            ``nn.Module`` (then ``tokenizer`` is required).
        tokenizer: the teacher's tokenizer (default for a named teacher: loaded with it).
        teacher_name: the teacher's name in the manifest (default: ``teacher`` as given, or a
            module's ``name_or_path``).
        top_k: tokens kept per target position, 1 to the teacher's vocabulary.
        temperature: the stored log-probabilities are ``log_softmax(logits / temperature)``.
        teacher_dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the hardware's choice,
            :func:`lrkd.hardware.auto_teacher_dtype`; a module keeps its dtype).
        logprob_dtype: storage type of the log-probabilities: ``float16`` or ``float32``.
        batch_size: examples per teacher forward.
        device: where the teacher runs (default ``cuda:LOCAL_RANK`` with CUDA, else the CPU).
        shard: this process's share of the pieces (default ``RANK``, else 0).
        num_shards: processes sharing the pieces (default ``WORLD_SIZE``, else 1).
        examples_per_piece: consecutive examples computed and saved together (the unit of
            resuming and sharding).
        overwrite: replace an ``out`` that holds another cache or prepared dataset.

    Returns:
        ``out`` (complete only when this process assembled it, or found it complete).

    Raises:
        ValueError: an argument out of range (naming it), a teacher whose tokenizer is not the
            prepared data's, a teacher cache given as ``prepared``, or an ``out`` that holds
            something else (without ``overwrite``).
        FileNotFoundError: ``prepared`` is not a prepared directory.
    """
    _check_arguments(top_k, temperature, teacher_dtype, logprob_dtype, batch_size,
                     examples_per_piece)  # fmt: skip
    shard, num_shards = _shards(shard, num_shards)
    prepared, out = Path(prepared).expanduser(), Path(out).expanduser()
    manifest = _read_prepared(prepared)
    found = _resolve_teacher(teacher, tokenizer, teacher_dtype, teacher_name)
    made = manifest["tokenizer"]
    if tokenizer_fingerprint(found.tokenizer) != made["fingerprint"]:
        raise ValueError(
            f"--teacher {found.name!r} has another tokenizer than the one --prepared {prepared} "
            f"was tokenised with ({made['name']!r}); prepare the data with the teacher's: "
            f"lrkd prepare --like {prepared} --tokenizer {found.name or 'TEACHER'} --out NEW_DIR"
        )
    _check_top_k(top_k, found.vocab_size)
    dtype = _dtype_name(found.dtype)
    key = cache_key(manifest["key"], found.fingerprint, dtype, temperature, top_k, logprob_dtype)
    if _check_out(out, prepared, key, overwrite):
        log.warning("lrkd cache-teacher: %s holds this cache already (same data, teacher and "
                    "settings)", out)  # fmt: skip
        return out

    from datasets import load_from_disk

    # A split with no examples (too little validation text for one block) is saved without
    # Arrow files, which load_from_disk cannot open; the cache leaves it out, as training does.
    data = {split: load_from_disk(str(prepared / split))
            for split, stats in manifest["splits"].items() if stats["examples"]}  # fmt: skip
    pieces = _plan({split: len(ds) for split, ds in data.items()}, examples_per_piece)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _open_staging(out, key, examples_per_piece)
    pieces_dir = staging / PIECES
    mine = [p for ordinal, p in enumerate(pieces)
            if ordinal % num_shards == shard and not _done(pieces_dir, p)]  # fmt: skip
    if mine:
        settings = _Settings(top_k, float(temperature), logprob_dtype, batch_size,
                             _pad_id(found.tokenizer))  # fmt: skip
        _compute(found, data, mine, pieces_dir, settings,
                 torch.device(device) if device is not None else _default_device(),
                 f"shard {shard}/{num_shards}" if num_shards > 1 else "")  # fmt: skip
    missing = [p for p in pieces if not _done(pieces_dir, p)]
    if missing:
        log.warning(
            "lrkd cache-teacher: %d of %d pieces remain (other shards); the process that "
            "finishes the last one assembles %s", len(missing), len(pieces), out,
        )  # fmt: skip
        return out
    try:
        _assemble(staging, out, prepared, manifest, data, pieces, found, key,
                  {"dtype": dtype, "temperature": float(temperature), "top_k": top_k,
                   "logprob_dtype": logprob_dtype})  # fmt: skip
    except Exception:
        # Two processes that finished the last pieces together both assemble; the second may
        # find the staging directory removed under it by the first.
        if _holds(out, key):
            log.info("lrkd cache-teacher: another process assembled %s first", out)
            return out
        raise
    return out


def _check_top_k(top_k: int, vocab_size: int) -> None:
    if vocab_size and top_k > vocab_size:
        raise ValueError(f"--top_k must be at most the teacher's vocabulary ({vocab_size} "
                         f"tokens), got {top_k}")  # fmt: skip


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _compute(found: _Teacher, data: dict[str, Any], pieces: list[_Piece], pieces_dir: Path,
             settings: _Settings, device: torch.device, who: str) -> None:  # fmt: skip
    """Compute and save ``pieces``, with a progress bar over their target tokens."""
    from tqdm.auto import tqdm

    model = found.model(device)
    _check_top_k(settings.top_k, found.vocab_size)
    settings = replace(settings, vocab_size=found.vocab_size)
    id_type = _id_type(found.vocab_size)
    tables = {split: ds.with_format("arrow") for split, ds in data.items()}
    total = sum(len(span) for piece in pieces
                for span in _spans(tables[piece.split][piece.start : piece.stop])[1])  # fmt: skip
    start = time.perf_counter()
    desc = f"lrkd cache-teacher {who}".rstrip()
    with (tqdm(total=total, desc=desc, unit="tok", mininterval=1.0) as progress,
          torch.no_grad(), _no_kv_cache(model)):  # fmt: skip
        for piece in pieces:
            began = time.perf_counter()
            table, stats = _compute_piece(model, tables[piece.split][piece.start : piece.stop],
                                          settings, device, progress)  # fmt: skip
            stats["seconds"] = round(time.perf_counter() - began, 3)
            features = _features(data[piece.split].features, id_type, settings.logprob_dtype)
            _save_piece(table, features, stats, pieces_dir, piece)
    seconds = time.perf_counter() - start
    log.warning(
        "lrkd cache-teacher: %scomputed %d pieces, %d target tokens in %.1f s (%.0f tokens/s)",
        f"{who}: " if who else "", len(pieces), total, seconds, total / max(seconds, 1e-9),
    )  # fmt: skip


def _assemble(staging: Path, out: Path, prepared: Path, manifest: dict[str, Any],
              data: dict[str, Any], pieces: list[_Piece], found: _Teacher, key: str,
              chosen: dict[str, Any]) -> None:  # fmt: skip
    """Concatenate the pieces per split, add ``teacher/`` and the manifest, and rename the
    result into place."""
    from datasets import Dataset, DatasetInfo, concatenate_datasets, load_from_disk

    began = time.perf_counter()
    pieces_dir = staging / PIECES
    infos = {p: json.loads((pieces_dir / p.name / PIECE_FILE).read_text()) for p in pieces}
    vocabs = {info["vocab_size"] for info in infos.values()}
    if len(vocabs) > 1:
        raise RuntimeError(f"the pieces in {pieces_dir} disagree on the teacher's vocabulary "
                           f"({sorted(vocabs)}); remove the directory and run again")  # fmt: skip
    vocab = vocabs.pop() if vocabs else found.vocab_size
    id_type = _id_type(vocab)
    assembly = staging / f".assembly-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(assembly, ignore_errors=True)
    assembly.mkdir()
    for split, ds in data.items():
        own = [p for p in pieces if p.split == split]
        if own:
            parts = [load_from_disk(str(pieces_dir / p.name)) for p in own]
            whole = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        else:
            features = _features(ds.features, id_type, chosen["logprob_dtype"])
            whole = Dataset(features.arrow_schema.empty_table(),
                            info=DatasetInfo(features=features))  # fmt: skip
        if len(whole) != len(ds):
            raise RuntimeError(f"{split}: the pieces hold {len(whole)} examples, the prepared "
                               f"split {len(ds)}; remove {staging} and run again")  # fmt: skip
        whole.save_to_disk(str(assembly / split))
    _save_teacher(found, assembly / TEACHER_DIR)
    target_tokens = sum(info["target_tokens"] for info in infos.values())
    column_bytes = 0
    for split in data:
        table = load_from_disk(str(assembly / split)).data
        column_bytes += sum(table.column(name).nbytes for name in COLUMNS)
    seconds = sum(info.get("seconds", 0.0) for info in infos.values())
    seconds += time.perf_counter() - began
    info = TeacherCacheInfo(
        teacher=found.name, teacher_fingerprint=found.fingerprint, dtype=chosen["dtype"],
        temperature=chosen["temperature"], top_k=chosen["top_k"],
        logprob_dtype=chosen["logprob_dtype"], id_type=id_type, vocab_size=vocab,
        target_tokens=target_tokens,
        bytes_per_token=round(column_bytes / max(target_tokens, 1), 3),
        seconds=round(seconds, 2),
        prepared={"path": str(prepared.resolve()), "key": manifest["key"]},
    )  # fmt: skip
    write_manifest(assembly, {**manifest, "key": key, "teacher_cache": asdict(info)})
    _move_into_place(assembly, out, key)
    shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    examples = sum(len(ds) for ds in data.values())
    log.warning(
        "lrkd cache-teacher: wrote %s: %d examples, %d target tokens, %.1f bytes/token, "
        "%.1f MB, %.1f s (%.0f tokens/s)", out, examples, target_tokens, info.bytes_per_token,
        size / 1e6, info.seconds, target_tokens / max(info.seconds, 1e-9),
    )  # fmt: skip


def _save_teacher(found: _Teacher, directory: Path) -> None:
    """The teacher's config, generation config and tokenizer; never its weights."""
    directory.mkdir(parents=True)
    config = found.config
    if config is None:
        raise ValueError("--teacher: the module has no Hugging Face config to store with the "
                         "cache (a teacher cache keeps the teacher's config.json)")  # fmt: skip
    config.save_pretrained(directory)
    generation = getattr(found.module, "generation_config", None) if found.module else None
    if generation is None and found.source is not None:
        from transformers import GenerationConfig

        with contextlib.suppress(OSError):
            generation = GenerationConfig.from_pretrained(found.source)
    if generation is not None:
        generation.save_pretrained(directory)
    found.tokenizer.save_pretrained(directory)


def cache_teacher_command(
    prepared: str,
    out: str,
    teacher: str,
    top_k: int = 32,
    temperature: float = 1.0,
    teacher_dtype: str = "auto",
    logprob_dtype: str = "float16",
    batch_size: int = 8,
    shard: int | None = None,
    num_shards: int | None = None,
    examples_per_piece: int = 512,
    overwrite: bool = False,
) -> Path:
    """Run the teacher once over prepared data and save its top-k next-token log-probabilities
    (``model.teacher_cache: OUT`` in ``lrkd fit`` then trains without loading it).

    An interrupted run continues where it stopped when run again with the same arguments;
    several processes (``torchrun --nproc_per_node N``, or ``--shard``/``--num_shards`` by hand,
    on machines sharing a file system) share the work, and the last to finish writes ``OUT``.

    Args:
        prepared: a prepared directory (``lrkd prepare``) tokenised with the teacher's tokenizer.
        out: the teacher cache to write (new or empty; one holding this cache already is left
            as it is). Its pieces are staged in ``.OUT.partial`` next to it.
        teacher: the teacher: a built-in name, local Hugging Face model directory or hub id.
        top_k: tokens kept per target position (1 to the teacher's vocabulary; the rest is kept
            as one tail probability).
        temperature: the stored log-probabilities are ``log_softmax(logits / temperature)``;
            train with the same ``temperature``.
        teacher_dtype: the teacher's dtype: ``auto`` (bfloat16 where the hardware runs it fast,
            else float32), ``float32``, ``bfloat16`` or ``float16``.
        logprob_dtype: storage type of the log-probabilities: ``float16`` (half the size) or
            ``float32``.
        batch_size: examples per teacher forward.
        shard: this process's share of the work (default: ``RANK``, else 0).
        num_shards: processes sharing the work (default: ``WORLD_SIZE``, else 1).
        examples_per_piece: consecutive examples computed and saved together: the unit of
            resuming and sharding (a rerun with another value starts afresh).
        overwrite: replace an ``out`` that holds another teacher cache or prepared dataset.

    Returns:
        The teacher cache's directory.
    """
    return cache_teacher(
        prepared, out, teacher, top_k=top_k, temperature=temperature,
        teacher_dtype=teacher_dtype, logprob_dtype=logprob_dtype, batch_size=batch_size,
        shard=shard, num_shards=num_shards, examples_per_piece=examples_per_piece,
        overwrite=overwrite,
    )  # fmt: skip
