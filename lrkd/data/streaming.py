"""Text streamed from files that need not fit on local disk: Hugging Face ``datasets`` streaming
mode, tokenised and packed into blocks as it is read, each process reading its share.

The stream of one process is deterministic (its share of the files, a seeded shuffle buffer,
the same tokenizer), so a run resumed from a mid-run checkpoint reads its share again from the
start and skips the blocks it trained on: the rest of the run is exactly the uninterrupted run's,
at the cost of re-reading (for remote files, downloading again) what was skipped. Passes over
the data repeat without end (each with its own shuffle), so the run's length is
``trainer.max_steps``, and no process runs out of data before another (which would hang DDP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from lrkd.data.manifest import PrepareSettings
from lrkd.data.records import expand_sources

__all__ = ["StreamedBlocks", "streaming_builder"]

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text",
             ".arrow": "arrow"}  # fmt: skip


def streaming_builder(files: list[str]) -> tuple[str, list[str]]:
    """The ``datasets`` builder (``json``, ``parquet``, ``text``, ``arrow``) for ``files`` and the
    files to stream: local paths expanded (directories to their files), URLs (``scheme://``) as
    they are.

    Raises:
        ValueError: files of several types, or of a type that cannot be streamed.
    """
    local = [f for f in files if "://" not in f]
    expanded = [str(p) for p in expand_sources(local)] if local else []
    paths = expanded + [f for f in files if "://" in f]
    suffixes = {Path(p.split("?")[0]).suffix.lower() for p in paths}
    builders = {_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"data.streaming: data.train_files must all be one of {', '.join(_BUILDERS)}, got "
            f"{', '.join(sorted(suffixes))}"
        )
    return builders.pop(), paths


class StreamedBlocks(IterableDataset):
    """Blocks of ``seq_length`` tokens packed as text is streamed: documents closed by EOS and
    concatenated, as ``pack="concat"`` does, for one process's share of the files.

    Args:
        files: local files or directories, or URLs that ``fsspec`` reads (``s3://``, ``hf://``,
            ``https://``), all of one type.
        tokenizer: the teacher's tokenizer.
        settings: ``seq_length``, ``seed`` and ``text_field`` are used.
        rank: this process's index among ``world_size`` (each reads its share).
        world_size: the number of processes.
        shuffle_buffer: documents in the shuffle buffer (0: the files' order).
        blocks_done: how many of this process's blocks to skip (read when iteration starts:
            a resumed run's blocks trained on already).
    """

    def __init__(
        self, files: list[str], tokenizer: Any, settings: PrepareSettings, rank: int = 0,
        world_size: int = 1, shuffle_buffer: int = 10_000,
        blocks_done: Callable[[], int] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.builder, self.files = streaming_builder(files)
        self.tokenizer = tokenizer
        self.settings = settings
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.blocks_done = blocks_done or (lambda: 0)

    def _stream(self, epoch: int) -> Any:
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        kwargs = {"sample_by": "paragraph"} if self.builder == "text" else {}
        stream = load_dataset(self.builder, data_files=self.files, split="train", streaming=True,
                              **kwargs)  # fmt: skip
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        if self.shuffle_buffer:
            stream = stream.shuffle(seed=self.settings.seed, buffer_size=self.shuffle_buffer)
            stream.set_epoch(epoch)
        return stream

    def _documents(self, epoch: int) -> Iterator[list[str]]:
        field = "text" if self.builder == "text" else self.settings.text_field
        for batch in self._stream(epoch).iter(batch_size=256):
            if field not in batch:
                raise ValueError(
                    f"data.streaming: the streamed records have no {field!r} field (they have "
                    f"{sorted(batch)}); streaming reads plain text: set data.text_field"
                )
            texts = [t.strip() if self.builder == "text" else t for t in batch[field]]
            yield [t for t in texts if self.builder != "text" or t]

    def blocks(self) -> Iterator[torch.Tensor]:
        """This process's blocks, pass after pass (without end)."""
        eos, length = self.tokenizer.eos_token_id, self.settings.seq_length
        carry = np.zeros(0, dtype=np.int64)
        epoch = 0
        while True:
            produced = 0
            for docs in self._documents(epoch):
                ids = self.tokenizer(docs, add_special_tokens=False)["input_ids"]
                flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
                flat = np.concatenate([carry, flat])
                n = len(flat) // length
                for block in flat[: n * length].reshape(n, length):
                    produced += 1
                    yield torch.from_numpy(block.copy())
                carry = flat[n * length :]
            if not produced:
                raise ValueError(
                    f"data.streaming: process {self.rank} of {self.world_size} read no full "
                    f"block of {length} tokens from {self.files[:3]}; give more text (or fewer "
                    "processes than files)"
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        skip = self.blocks_done()
        for position, ids in enumerate(self.blocks()):
            if position < skip:
                continue
            ones = torch.ones_like(ids)
            yield {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}
