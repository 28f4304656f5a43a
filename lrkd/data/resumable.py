"""Samplers whose epoch a run resumed from a mid-epoch checkpoint continues where it stopped.

Lightning restarts the epoch's iterator from its beginning when it resumes from a mid-epoch
checkpoint with a plain DataLoader (it only counts on to the epoch's end), so without help a
resumed run trains again on the epoch's first batches.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler

from lrkd._compat import epoch_batches_done
from lrkd.seeds import row_seed


class ResumableSampler(Sampler[int]):
    """An epoch of ``num_samples`` indices drawn chunk by chunk (:meth:`next_chunk`) from a
    generator seeded by (seed, epoch), which a resumed run continues at the same data position.

    The sampler keeps the epoch's draws so far and its generator state (:meth:`state_dict`; the
    DataModule saves it in the checkpoint). A restored sampler, iterated again in the same epoch,
    skips the examples already trained on: the Trainer's batches of the epoch so far
    (:func:`lrkd._compat.epoch_batches_done`, i.e. micro-batches, not optimizer steps) x the batch
    size x the number of processes, as they were when the checkpoint was written. It then
    yields the saved draws after those and goes on drawing from the saved generator state, so
    the rest of the epoch is exactly the uninterrupted run's, even where the draws depend on
    state that changed since the epoch began (a replay would not reproduce that). Under DDP,
    Lightning's ``DistributedSamplerWrapper`` deals the epoch's list out to the ranks in its own
    (shuffled, padded) order; there the sampler returns the whole list, rearranged so that each
    rank's share continues where that rank stopped.

    Args:
        datamodule: the DataModule that owns the sampler (its ``trainer`` and ``batch_size``
            are read).
        num_samples: indices per epoch.
        seed: seed of the draw (with the epoch).
    """

    def __init__(self, datamodule: Any, num_samples: int, seed: int) -> None:
        self.datamodule = datamodule
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._restored: dict[str, Any] | None = None
        # The current epoch's draws: epoch, chunks of indices, generator, batch size, processes.
        self._live: dict[str, Any] | None = None

    def next_chunk(self, produced: int, generator: torch.Generator) -> torch.Tensor:
        """The next indices of the epoch (``produced`` are drawn already); draw only from
        ``generator``."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (Lightning calls it), which seeds the draw."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """The current epoch's draws so far and the generator state after them, with the batch
        size and the number of processes that consume them."""
        live = self._live
        if live is None:
            return dict(self._restored or {})
        chunks = live["chunks"]
        return {
            "epoch": live["epoch"],
            "num_samples": self.num_samples,
            "indices": torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64),
            "generator": live["generator"].get_state(),
            "batch_size": live["batch_size"],
            "world_size": live["world_size"],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved :meth:`state_dict` when next iterated in the saved epoch."""
        self._restored = dict(state_dict) if state_dict else None

    def __iter__(self) -> Iterator[int]:
        restored, self._restored = self._restored, None
        shard = self._distributed_sampler()
        start = 0
        if restored is not None:
            start = self._batches_done() * restored["batch_size"] * restored["world_size"]
            same_epoch = (restored["epoch"], restored["num_samples"]) == (
                self.epoch, self.num_samples
            )  # fmt: skip
            if not same_epoch or start >= self.num_samples:  # another epoch: start afresh
                restored = None
        if restored is not None:
            chunks = [restored["indices"].to(torch.int64)]
            generator = torch.Generator()
            generator.set_state(restored["generator"])
        else:
            chunks, start = [], 0
            generator = torch.Generator().manual_seed(row_seed(self.seed, "sampler", self.epoch))
        world = shard.num_replicas if shard is not None else 1
        self._live = {"epoch": self.epoch, "chunks": chunks, "generator": generator,
                      "batch_size": self.datamodule.batch_size, "world_size": world}  # fmt: skip
        indices = self._draw(chunks, generator)
        if start and shard is not None:
            yield from _continue_shards(list(indices), shard, start)
            return
        for position, index in enumerate(indices):
            if position >= start:
                yield index

    def _draw(self, chunks: list[torch.Tensor], generator: torch.Generator) -> Iterator[int]:
        """The epoch's indices: the saved chunks, then new ones (appended to ``chunks``)."""
        produced = 0
        for chunk in list(chunks):
            produced += len(chunk)
            yield from chunk.tolist()
        while produced < self.num_samples:
            drawn = self.next_chunk(produced, generator)
            chunks.append(drawn)
            produced += len(drawn)
            yield from drawn.tolist()

    def _batches_done(self) -> int:
        """The Trainer's batches of the current epoch so far (restored when resuming)."""
        return epoch_batches_done(self.datamodule.trainer)

    def _distributed_sampler(self) -> DistributedSampler | None:
        """The DistributedSampler that deals this sampler's indices out to the ranks, if any."""
        trainer = self.datamodule.trainer
        loader = trainer.train_dataloader if trainer is not None else None
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler) and sampler is not self:
            return sampler
        return None


def _continue_shards(indices: list[int], shard: DistributedSampler, start: int) -> list[int]:
    """``indices`` rearranged so that every rank's share under ``shard`` continues after the
    first ``start`` examples of the epoch (in the order the ranks consume them)."""
    ranks = []
    for rank in range(shard.num_replicas):
        view = copy.copy(shard)
        view.rank = rank
        ranks.append(list(DistributedSampler.__iter__(view)))
    # Position j of the epoch's order is rank j % W's (j // W)-th example.
    order = [share[m] for m in range(len(ranks[0])) for share in ranks]
    consumed = [indices[i] for i in order]
    out = list(indices)
    # The first occurrence of a position wins (DistributedSampler pads with repeats).
    for j in reversed(range(len(order))):
        out[order[j]] = consumed[(j + start) % len(order)]
    return out


class ShuffledSampler(ResumableSampler):
    """A new random permutation of ``num_samples`` examples every epoch, resumable mid-epoch."""

    def next_chunk(self, produced: int, generator: torch.Generator) -> torch.Tensor:
        """The epoch's permutation."""
        return torch.randperm(self.num_samples, generator=generator)[produced:]
