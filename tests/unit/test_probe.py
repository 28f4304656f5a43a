"""probe_batch: the token ids a teacher is probed with (activation-PCA init, rank advisor).

Reference: the texts tokenised one at a time by hand with the character-level test tokenizer
(no special tokens added), concatenated and cut into rows of 256.
"""

from __future__ import annotations

import torch

from lrkd.data.corpus import builtin_corpus
from lrkd.data.probe import PROBE_ROW_LENGTH, probe_batch


def _by_hand(tokenizer, texts) -> list[int]:
    return [i for text in texts for i in tokenizer.encode(text)]


def test_builtin_corpus_probe_is_packed_and_deterministic(tiny_tokenizer) -> None:
    ids = probe_batch(tiny_tokenizer, n_tokens=1024)
    assert PROBE_ROW_LENGTH == 256
    assert ids.shape == (4, 256) and ids.dtype == torch.long
    # max(64, 1024 // 64) documents of the built-in corpus, seed 1234.
    expected = _by_hand(tiny_tokenizer, builtin_corpus(num_documents=64, seed=1234))
    assert ids.flatten().tolist() == expected[:1024]
    assert torch.equal(probe_batch(tiny_tokenizer, n_tokens=1024), ids)
    assert probe_batch(tiny_tokenizer, n_tokens=4096).shape == (16, 256)


def test_texts_are_concatenated_and_cut_to_whole_rows(tiny_tokenizer) -> None:
    texts = ["a" * 200, "b" * 200, "c" * 200]
    stream = _by_hand(tiny_tokenizer, texts)
    assert stream == [tiny_tokenizer.convert_tokens_to_ids(c) for c in "".join(texts)]
    # Enough for two rows; the 88 ids after them are dropped.
    ids = probe_batch(tiny_tokenizer, texts)
    assert ids.shape == (2, 256)
    assert ids.flatten().tolist() == stream[:512]
    # Tokenising stops once n_tokens are reached (after the second text): one row.
    ids = probe_batch(tiny_tokenizer, texts, n_tokens=300)
    assert ids.shape == (1, 256)
    assert ids.flatten().tolist() == stream[:256]
    # Fewer than 256 requested: one whole row when the first texts hold one, else what they
    # hold (tokenising stops after the first text here).
    assert probe_batch(tiny_tokenizer, ["a" * 300], n_tokens=100).shape == (1, 256)
    assert probe_batch(tiny_tokenizer, texts, n_tokens=100).tolist() == [stream[:200]]


def test_fewer_than_a_row_of_ids_is_one_short_row(tiny_tokenizer) -> None:
    texts = ["hello world", "abc"]
    ids = probe_batch(tiny_tokenizer, texts)
    assert ids.shape == (1, 14)
    assert ids[0].tolist() == _by_hand(tiny_tokenizer, texts)
