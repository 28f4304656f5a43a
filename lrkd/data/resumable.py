"""Samplers whose epoch a run resumed from a mid-epoch checkpoint continues where it stopped.

Lightning restarts the epoch's iterator from its beginning when it resumes from a mid-epoch
checkpoint with a plain DataLoader (it only counts on to the epoch's end), so without help a
resumed run trains again on the epoch's first batches.
"""

from __future__ import annotations

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
    state that changed since the epoch began (a replay would not reproduce that). Under DDP/FSDP
    the DataLoader gets :meth:`for_ranks`, a :class:`RankShare` that deals the epoch's list out
    to the processes, each continuing where it stopped.

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
        return self.share(0, 1)

    def for_ranks(self) -> Sampler[int]:
        """The sampler for the DataLoader: this sampler, or under DDP/FSDP a :class:`RankShare`
        of it that gives this process its share of the epoch (Lightning then adds no
        DistributedSampler of its own)."""
        trainer = self.datamodule.trainer
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer else None
        if not kwargs or kwargs["num_replicas"] == 1:
            return self
        return RankShare(self, kwargs["num_replicas"], kwargs["rank"])

    def share(self, rank: int, world: int) -> Iterator[int]:
        """Process ``rank``'s indices of the current epoch among ``world`` processes: the
        epoch's list, padded to a multiple of ``world`` with its first indices, dealt out
        position by position (as a DistributedSampler without shuffling deals it), after the
        positions trained on already when a mid-epoch checkpoint was restored."""
        restored, self._restored = self._restored, None
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
        self._live = {"epoch": self.epoch, "chunks": chunks, "generator": generator,
                      "batch_size": self.datamodule.batch_size, "world_size": world}  # fmt: skip
        indices = self._draw(chunks, generator)
        if world == 1:  # drawn as consumed: later draws may depend on training so far
            for position, index in enumerate(indices):
                if position >= start:
                    yield index
            return
        epoch = list(indices)
        total = -(-len(epoch) // world) * world
        padded = (epoch * (-(-total // len(epoch))))[:total] if epoch else []
        yield from padded[start + rank :: world]

    def _draw(self, chunks: list[torch.Tensor], generator: torch.Generator) -> Iterator[int]:
        """The epoch's indices: the saved chunks, then new ones (appended to ``chunks``)."""
        produced = 0
        for chunk in list(chunks):
            produced += len(chunk)
            yield from _as_ints(chunk)
        while produced < self.num_samples:
            drawn = self.next_chunk(produced, generator)
            chunks.append(drawn)
            produced += len(drawn)
            yield from _as_ints(drawn)

    def _batches_done(self) -> int:
        """The Trainer's batches of the current epoch so far (restored when resuming)."""
        return epoch_batches_done(self.datamodule.trainer)


def _as_ints(chunk: torch.Tensor, size: int = 1 << 16) -> Iterator[int]:
    """The indices of ``chunk`` as Python ints, converted a slice at a time (an epoch of
    millions of blocks is never one Python list)."""
    for part in chunk.split(size):
        yield from part.tolist()


class RankShare(DistributedSampler):
    """One process's share of a :class:`ResumableSampler`'s epoch under DDP/FSDP.

    A DistributedSampler (so Lightning adds none) of ``ceil(num_samples / num_replicas)``
    indices, the same ones in the same order as Lightning's own DistributedSampler would deal
    (no shuffling: the sampler shuffles), except that a run resumed mid-epoch gets only the
    indices its process had not trained on: its last batch is then as short as in the
    uninterrupted run, and each index of the epoch is still trained on once.

    Args:
        sampler: the epoch's sampler.
        num_replicas: the number of data-parallel processes.
        rank: this process's data-parallel rank.
    """

    def __init__(self, sampler: ResumableSampler, num_replicas: int, rank: int) -> None:
        super().__init__(range(len(sampler)), num_replicas=num_replicas, rank=rank,
                         shuffle=False, drop_last=False)  # fmt: skip
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the shared sampler (which seeds its draw)."""
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return self.sampler.share(self.rank, self.num_replicas)


class ShuffledSampler(ResumableSampler):
    """A new random permutation of ``num_samples`` examples every epoch, resumable mid-epoch."""

    def next_chunk(self, produced: int, generator: torch.Generator) -> torch.Tensor:
        """The epoch's permutation."""
        return torch.randperm(self.num_samples, generator=generator)[produced:]
