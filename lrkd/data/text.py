"""Language-modelling text and prompt+response examples from local files, for distillation.

Two kinds of records (:mod:`lrkd.data.records`) are read from ``.txt``, ``.jsonl``/``.json``,
``.parquet`` and ``.arrow`` files, directories of them and saved ``datasets`` directories:

- **text** (a ``.txt`` file is one document per blank-line-separated paragraph; a JSONL or
  parquet record has a ``text`` field): tokenised, joined with EOS and packed into blocks of
  ``seq_length`` tokens; every token is a training target.
- **prompt + response** (records with ``prompt`` and ``response`` fields): one example each,
  the prompt formatted with the tokenizer's chat template when it has one, right-padded in the
  batch; only response tokens (and the closing EOS) are training targets.

Training reads a prepared directory (:mod:`lrkd.data.prepare`, ``lrkd prepare``), memory-mapped:
given as ``prepared``, or made from ``train_files`` on first use in a cache keyed by the files'
contents, the tokenizer and the settings (once per node: Lightning runs ``prepare_data`` on each
node's first process). Every batch is a dict of ``input_ids``, ``attention_mask`` and
``loss_mask`` [B, L] (see :class:`lrkd.module.DistillationModule`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from lrkd._compat import epoch_batches_done
from lrkd.data.checks import check_at_least
from lrkd.data.manifest import MANIFEST, PrepareSettings, check_manifest, read_manifest
from lrkd.data.prepare import check_settings, prepare, prepared_path
from lrkd.data.prepared import PreparedExamples
from lrkd.data.records import located_records, read_records
from lrkd.data.resumable import ShuffledSampler
from lrkd.data.streaming import StreamedBlocks
from lrkd.data.tokens import pad_collate, resolve_tokenizer

__all__ = ["TextDataModule", "located_records", "read_records"]

log = logging.getLogger("lrkd")

# Keys of the datasets this process prepared (and so warned about already).
_PREPARED_HERE: set[str] = set()


class TextDataModule(LightningDataModule):
    """Text or prompt+response data, tokenised with the teacher's tokenizer and read memory-mapped
    from a prepared directory.

    With neither ``train_files`` nor ``prepared``, the built-in generated corpus is used (no
    download). Raw files are prepared on first use into ``cache_dir`` (see
    :mod:`lrkd.data.prepare`; ``lrkd prepare`` does the same ahead of time).

    Args:
        train_files: ``.txt``, ``.jsonl``/``.json``, ``.parquet`` or ``.arrow`` files,
            directories of them or saved ``datasets`` directories (see the module docs for the
            record formats). ``None`` uses the built-in corpus (or ``prepared``).
        val_files: validation files; ``None`` holds out ``val_fraction`` of the training records.
        prepared: a directory written by ``lrkd prepare`` to train on, instead of
            ``train_files``/``val_files``. It must have been made with the teacher's tokenizer
            and this ``seq_length`` (an error says what differs and how to prepare it again).
        tokenizer: the teacher's tokenizer: a built-in name, local directory or hub id (``lrkd
            fit`` fills in ``model.teacher`` when it is a name and this is left out).
        seq_length: tokens per packed block, and the truncation length of prompt+response
            examples (a record cut at its response's end is counted in a warning).
        batch_size: examples per batch (per device).
        val_fraction: share of records held out for validation when ``val_files`` is None.
        chat_template: format prompts with the tokenizer's chat template when it has one.
        text_field: the JSONL/parquet field holding plain text.
        prompt_field: the field holding a prompt.
        response_field: the field holding a response.
        builtin_documents: number of generated documents when the built-in corpus is used.
        num_workers: DataLoader worker processes.
        seed: seed for the built-in corpus, the validation split and shuffling.
        overlong: what to do with a prompt+response record whose prompt alone has
            ``seq_length`` tokens or more, so that no response token would be trained on:
            ``error`` (refuse the data, naming the count and the ``seq_length`` that fits),
            ``drop`` (leave those records out, with a warning giving the count),
            ``truncate_left`` (every record longer than ``seq_length`` loses the start of its
            prompt instead of the end of its response, with a warning giving the count) or
            ``keep`` (keep them as cut, with no target, with a warning: what earlier versions
            did silently). Packed text is never overlong.
        pack: how text is cut into blocks: ``concat`` (documents joined with EOS, every block
            full) or ``documents`` (no block mixes documents: each is cut alone and its last
            piece right-padded in the batch, at the cost of padding).
        prepare_workers: processes that prepare raw files (``None``: one for inputs under
            32 MB, else every CPU, at most 16).
        cache_dir: where raw files are prepared on first use; ``None`` is
            ``$LRKD_CACHE_DIR/data`` (default ``~/.cache/lrkd/data``).
        streaming: stream ``train_files`` (local paths or ``fsspec`` URLs, plain text) instead
            of preparing them: tokenised and packed as read, each process reading its share,
            passes repeating until ``trainer.max_steps`` (see :mod:`lrkd.data.streaming`:
            a resumed run re-reads its share up to where it stopped). ``val_files`` are
            prepared as usual.
        shuffle_buffer: documents in the streaming shuffle buffer (0: the files' order).
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        prepared: str | None = None,
        tokenizer: str | None = None,
        seq_length: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        chat_template: bool = True,
        text_field: str = "text",
        prompt_field: str = "prompt",
        response_field: str = "response",
        builtin_documents: int = 2000,
        num_workers: int = 0,
        seed: int = 0,
        overlong: str = "error",
        pack: str = "concat",
        prepare_workers: int | None = None,
        cache_dir: str | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
    ) -> None:
        super().__init__()
        self.settings = PrepareSettings(
            seq_length=seq_length, pack=pack, chat_template=chat_template, overlong=overlong,
            val_fraction=val_fraction, seed=seed, text_field=text_field,
            prompt_field=prompt_field, response_field=response_field,
            builtin_documents=builtin_documents,
        )  # fmt: skip
        check_settings(self.settings)
        check_at_least("data.batch_size", batch_size, 1)
        check_at_least("data.num_workers", num_workers, 0)
        check_at_least("data.prepare_workers", prepare_workers, 1)
        if prepared is not None and (train_files is not None or val_files is not None):
            raise ValueError(
                "data.prepared is given together with data.train_files/val_files; give one: "
                "the prepared directory already holds its training and validation splits"
            )
        check_at_least("data.shuffle_buffer", shuffle_buffer, 0)
        if streaming:
            _check_streaming(train_files, prepared, num_workers)
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        self.train_files = train_files
        self.val_files = val_files
        self.prepared = prepared
        self.tokenizer_name = tokenizer
        self.seq_length = seq_length
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.num_workers = num_workers
        self.seed = seed
        self.prepare_workers = prepare_workers
        self.cache_dir = cache_dir
        self.tokenizer: Any = None
        self.manifest: dict[str, Any] | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self._sampler: ShuffledSampler | None = None
        self._restored_sampler: dict[str, Any] | None = None

    def _load_tokenizer(self) -> None:
        if self.tokenizer is None:  # a tokenizer object may be set before setup
            self.tokenizer = resolve_tokenizer(self.tokenizer_name)

    def _cache_root(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        from lrkd.models.zoo import cache_dir

        return cache_dir() / "data"

    def prepare_data(self) -> None:
        """Prepare raw files (or the built-in corpus) into the cache, unless prepared already.
        Lightning calls this on each node's first process only; the others wait for it."""
        if self.streaming:
            if self.val_files is not None:
                self._load_tokenizer()
                self._val_dir()
        elif self.prepared is None:
            self._load_tokenizer()
            self._prepared_dir()

    def _val_dir(self) -> Path:
        """The prepared ``val_files`` of a streaming run (their ``train`` split)."""
        return self._cached(self.val_files, None, replace(self.settings, val_fraction=0.0))

    def _cached(
        self, train_files: list[str] | None, val_files: list[str] | None,
        settings: PrepareSettings,
    ) -> Path:  # fmt: skip
        """The cache entry of these files and settings, prepared now if it is not there."""
        path, _ = prepared_path(train_files, val_files, self.tokenizer, settings,
                                self._cache_root())  # fmt: skip
        if not (path / MANIFEST).is_file():
            prepare(train_files, path, self.tokenizer, settings, val_files=val_files,
                    tokenizer_name=self.tokenizer_name, num_proc=self.prepare_workers)  # fmt: skip
            _PREPARED_HERE.add(read_manifest(path)["key"])
        return path

    def _prepared_dir(self) -> Path:
        """The prepared directory to read: ``prepared``, checked against the run, or the cache
        entry of the raw files (prepared now if it is not there)."""
        if self.prepared is not None:
            path = Path(self.prepared).expanduser()
            check_manifest(read_manifest(path), path, self.tokenizer, self.tokenizer_name,
                           self.settings)  # fmt: skip
            return path
        return self._cached(self.train_files, self.val_files, self.settings)

    def setup(self, stage: str | None = None) -> None:
        """Open the prepared data (preparing raw files first when ``prepare_data`` has not)."""
        if self.train_dataset is not None:
            return
        self._load_tokenizer()
        if self.streaming:
            self._setup_streaming()
            return
        path = self._prepared_dir()
        self.manifest = read_manifest(path)
        if self.manifest["key"] not in _PREPARED_HERE:
            for message in self.manifest.get("warnings", []):
                log.warning("%s (prepared in %s)", message, path)
        self.train_dataset = PreparedExamples(path / "train")
        has_val = "val" in self.manifest["splits"] and self.manifest["splits"]["val"]["examples"]
        self.val_dataset = PreparedExamples(path / "val") if has_val else None

    def _setup_streaming(self) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.max_steps < 0:
            raise ValueError(
                "data.streaming: a stream has no length, so the run needs trainer.max_steps (and "
                "an integer trainer.val_check_interval to validate during it)"
            )
        shards = getattr(trainer, "distributed_sampler_kwargs", None) if trainer else None
        rank, world = (shards["rank"], shards["num_replicas"]) if shards else (0, 1)
        self.train_dataset = StreamedBlocks(
            self.train_files, self.tokenizer, self.settings, rank=rank, world_size=world,
            shuffle_buffer=self.shuffle_buffer, blocks_done=self._blocks_done,
        )  # fmt: skip
        self.val_dataset = None
        if self.val_files is not None:
            self.val_dataset = PreparedExamples(self._val_dir() / "train")

    def _blocks_done(self) -> int:
        """This process's blocks trained on so far in the run (restored when resuming)."""
        return epoch_batches_done(self.trainer) * self.batch_size if self.trainer else 0

    def _loader(self, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=partial(pad_collate, pad_token_id=pad),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (a new permutation every epoch; a run resumed mid-epoch
        continues at the same position, see :class:`lrkd.data.resumable.ResumableSampler`)."""
        assert self.train_dataset is not None, "call setup() first"
        if self.streaming:
            return self._loader(self.train_dataset, None)
        sampler = ShuffledSampler(self, len(self.train_dataset), self.seed)
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
        if self._restored_sampler:
            sampler.load_state_dict(self._restored_sampler)
            self._restored_sampler = None
        self._sampler = sampler
        return self._loader(self.train_dataset, sampler.for_ranks())

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's position in the epoch (saved in checkpoints)."""
        sampler = self._sampler.state_dict() if self._sampler is not None else None
        return {"sampler": sampler or self._restored_sampler}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training sampler's position of a checkpoint."""
        self._restored_sampler = state_dict.get("sampler")

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (an empty list when there is no validation data)."""
        return self._loader(self.val_dataset, None) if self.val_dataset else []

    def test_dataloader(self) -> DataLoader | list:
        """The validation split, used for ``lrkd test``."""
        return self.val_dataloader()


def _check_streaming(train_files: list[str] | None, prepared: str | None, workers: int) -> None:
    """Refuse a streaming setup that cannot work, naming the field."""
    if train_files is None or prepared is not None:
        raise ValueError(
            "data.streaming reads data.train_files (local paths or URLs of plain text); give them "
            "(and no data.prepared)"
        )
    if workers:
        raise ValueError(
            "data.streaming tokenises in the training process (so that a resumed run skips exactly "
            "the blocks it trained on); set data.num_workers: 0"
        )
