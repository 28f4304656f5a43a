"""The teacher cache: a prepared dataset whose examples also carry the teacher's top-k
next-token log-probabilities, so that students are trained without the teacher in the loop.

``lrkd cache-teacher`` (:mod:`lrkd.data.cache_teacher`) runs the teacher once over a prepared
directory (``lrkd prepare``) and writes a new directory in the same format: ``manifest.json``,
one saved ``datasets`` directory per split, and ``teacher/`` (the teacher's config and
tokenizer, never its weights). Each split holds the prepared columns (``input_ids``, and
``prompt_length`` for prompt+response data) and, for the example's target positions only:

- ``topk_ids``: the teacher's k most likely next tokens per target position, flattened
  position-major (``[n_targets * k]``), most likely first; ``uint16`` when the teacher predicts
  at most 65536 tokens, else ``int32``;
- ``topk_logprobs``: their log-probabilities under the teacher at the cache's temperature
  (``float16`` by default, or ``float32``), over the teacher's whole output vocabulary;
- ``tail_logprob``: ``[n_targets]``, the log of the teacher's probability mass outside its top-k
  (``-inf`` when the top-k covers the vocabulary).

The target positions of an example of L tokens whose first ``p`` tokens are prompt are
``max(p, 1) - 1 .. L - 2`` (position i predicts token i + 1; see
:func:`lrkd.objective.next_token_targets`): :func:`target_positions`.

The manifest is the prepared directory's, with its own ``key`` and a ``teacher_cache`` entry
(:class:`TeacherCacheInfo`): the teacher's name and fingerprint, the dtype it ran in, the
temperature, k, the storage types, the bytes per target token and the build time.

Training reads a cache like any prepared directory (``data.prepared``; ``lrkd fit`` sets it from
``model.teacher_cache``), and :class:`lrkd.data.prepared.PreparedExamples` expands the columns to
``topk_ids`` / ``topk_logprobs`` [L, k] and ``tail_logprob`` [L] per example (the batch keys of
:data:`COLUMNS`), filled at non-target positions with a harmless uniform distribution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrkd.data.manifest import MANIFEST, read_manifest

__all__ = [
    "COLUMNS",
    "LOGPROB_DTYPES",
    "TEACHER_DIR",
    "TeacherCacheInfo",
    "expand_targets",
    "read_teacher_cache",
    "target_positions",
    "teacher_config",
]

#: The columns a teacher cache adds to the prepared ones, and the batch keys they become: ids and
#: log-probs ([n_targets * k] stored, [B, L, k] in a batch), tail log-prob ([n_targets], [B, L]).
COLUMNS: tuple[str, ...] = ("topk_ids", "topk_logprobs", "tail_logprob")
#: Storage types of the log-probabilities (Arrow has no bfloat16).
LOGPROB_DTYPES: tuple[str, ...] = ("float16", "float32")
#: The subdirectory holding the teacher's config and tokenizer (never its weights).
TEACHER_DIR = "teacher"


@dataclass(frozen=True)
class TeacherCacheInfo:
    """What a teacher cache was made by and how (its manifest's ``teacher_cache`` entry).

    Attributes:
        teacher: the teacher as given to ``lrkd cache-teacher`` (a built-in name, directory or
            hub id).
        teacher_fingerprint: a hash of the teacher's config and weight files (names and sizes).
        dtype: the dtype the teacher ran in (``float32``, ``bfloat16``, ``float16``).
        temperature: the temperature of the stored log-probabilities.
        top_k: tokens kept per target position.
        logprob_dtype: the storage type of the log-probabilities.
        id_type: the storage type of the token ids.
        vocab_size: the number of logits the teacher produces per position.
        target_tokens: target positions cached, all splits.
        bytes_per_token: bytes of the cache columns per target position.
        seconds: the build's wall time.
        prepared: the prepared directory it was made from (``path``, ``key``).
    """

    teacher: str
    teacher_fingerprint: str
    dtype: str
    temperature: float
    top_k: int
    logprob_dtype: str
    id_type: str
    vocab_size: int
    target_tokens: int = 0
    bytes_per_token: float = 0.0
    seconds: float = 0.0
    prepared: dict[str, Any] | None = None

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> TeacherCacheInfo | None:
        """The entry of a manifest, ``None`` for a plain prepared directory."""
        entry = manifest.get("teacher_cache")
        if entry is None:
            return None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in names})


def read_teacher_cache(path: str | Path, field: str = "model.teacher_cache") -> TeacherCacheInfo:
    """The :class:`TeacherCacheInfo` of the teacher cache at ``path``.

    Raises:
        FileNotFoundError / ValueError: ``path`` is not a finished teacher cache, naming
            ``field`` and the command that makes one.
    """
    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{field}={str(path)!r} is not a teacher cache (no {MANIFEST}; an interrupted "
            "lrkd cache-teacher leaves none); make one with: lrkd cache-teacher --prepared "
            f"PREPARED --teacher TEACHER --out {path}"
        )
    info = TeacherCacheInfo.of(read_manifest(path))
    if info is None:
        raise ValueError(
            f"{field}={str(path)!r} is a prepared dataset without teacher log-probs; cache the "
            f"teacher over it: lrkd cache-teacher --prepared {path} --teacher TEACHER --out DIR"
        )
    return info


def teacher_config(path: str | Path) -> dict[str, Any]:
    """The teacher's Hugging Face config (a dict) stored in a teacher cache."""
    return json.loads((Path(path).expanduser() / TEACHER_DIR / "config.json").read_text())


def target_positions(length: int, prompt_length: int = 0) -> range:
    """The positions of an example of ``length`` tokens whose next token is a target: the
    prompt's last token predicts the first response token, and the last token predicts none."""
    return range(max(prompt_length, 1) - 1, max(length - 1, 0))


def expand_targets(
    ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, length: int, prompt_length: int
) -> dict[str, torch.Tensor]:
    """One example's cached columns as per-position tensors: ``topk_ids`` (int32) and
    ``topk_logprobs`` (float32) [L, k], ``tail_logprob`` [L]; positions that are not targets hold
    a uniform distribution over k tokens (never read by the loss: their mask is off)."""
    positions = target_positions(length, prompt_length)
    n = len(positions)
    k = len(ids) // n if n else 1
    out_ids = torch.arange(k, dtype=torch.int32).repeat(length, 1)
    out_logprobs = torch.full((length, k), -float(np.log(k)), dtype=torch.float32)
    out_tail = torch.full((length,), -float("inf"), dtype=torch.float32)
    if n:
        rows = slice(positions.start, positions.stop)
        out_ids[rows] = torch.from_numpy(np.asarray(ids, dtype=np.int32).reshape(n, k))
        out_logprobs[rows] = torch.from_numpy(np.asarray(logprobs, dtype=np.float32).reshape(n, k))
        out_tail[rows] = torch.from_numpy(np.asarray(tail, dtype=np.float32))
    return {"topk_ids": out_ids, "topk_logprobs": out_logprobs, "tail_logprob": out_tail}
