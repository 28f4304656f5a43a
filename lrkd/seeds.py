"""Stable per-row seeds: the random numbers of a sample, a rollout or a data draw depend only on
names (a base seed, a key such as a problem id, an index), never on batch composition, batch
size or the number of processes."""

from __future__ import annotations

import hashlib


def row_seed(seed: int, key: str | int, sample: int) -> int:
    """The generator seed of one completion: a stable hash of ``(seed, key, sample)``."""
    digest = hashlib.blake2b(f"{seed}|{key}|{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
