"""A probe batch: token ids of a small text sample, for measuring a teacher's activations.

The activation-PCA initialisation of a Low-Rank Clone (:class:`lrkd.models.lowrank.LowRankClone`
with ``init="activation_pca"``) and the rank advisor (:func:`lrkd.diagnostics.rank.rank_report`)
run the teacher on such a batch. Models never build it themselves: it is given to them as
``probe_input_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lrkd.data.corpus import builtin_corpus

PROBE_ROW_LENGTH: int = 256
"""Tokens per row of a probe batch."""

PROBE_CORPUS_SEED: int = 1234
"""Seed of the built-in corpus a probe batch is drawn from when no texts are given."""


def probe_batch(
    tokenizer: Any, texts: Sequence[str] | None = None, n_tokens: int = 8192
) -> torch.Tensor:
    """Token ids of ``texts`` (or of the built-in corpus), packed into rows of 256 tokens.

    The texts are tokenised one by one (with the special tokens ``tokenizer(text)`` adds) and
    their ids concatenated until at least ``n_tokens`` are collected (or the texts run out).
    With at least one row of ids, they are cut to ``min(collected, n_tokens) // 256`` whole rows
    (at least one); with fewer, all of them form a single shorter row.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text)["input_ids"]``), the
            teacher's.
        texts: the probe texts; ``None`` uses ``max(64, n_tokens // 64)`` documents of the
            built-in corpus (:func:`lrkd.data.corpus.builtin_corpus`, seed
            :data:`PROBE_CORPUS_SEED`).
        n_tokens: about how many tokens the batch holds.

    Returns:
        A long tensor [rows, 256], or [1, n] for n < 256 ids in all.
    """
    if texts is None:
        texts = builtin_corpus(num_documents=max(64, n_tokens // 64), seed=PROBE_CORPUS_SEED)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= n_tokens:
            break
    row = PROBE_ROW_LENGTH
    if len(ids) < row:
        return torch.tensor([ids])
    n_rows = max(1, min(len(ids), n_tokens) // row)
    return torch.tensor(ids[: n_rows * row]).view(n_rows, row)
