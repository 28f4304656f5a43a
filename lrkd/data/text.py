"""Language-modelling text and prompt+response examples from local files, for distillation.

Two kinds of records are read from ``.txt``, ``.jsonl``/``.json`` and ``.parquet`` files:

- **text** (a ``.txt`` file is one document per blank-line-separated paragraph; a JSONL or
  parquet record has a ``text`` field): tokenised, joined with EOS and packed into blocks of
  ``seq_length`` tokens; every token is a training target.
- **prompt + response** (records with ``prompt`` and ``response`` fields): one example each,
  the prompt formatted with the tokenizer's chat template when it has one, right-padded in the
  batch; only response tokens (and the closing EOS) are training targets.

Every batch is a dict of ``input_ids``, ``attention_mask`` and ``loss_mask`` [B, L] (see
:class:`lrkd.module.DistillationModule`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from lrkd.data.checks import (
    check_at_least,
    check_choice,
    check_fraction,
    not_utf8,
    read_utf8,
)
from lrkd.data.corpus import builtin_corpus
from lrkd.data.overlong import OVERLONG_MODES, fit_row, keep_rows, warn_long_rows
from lrkd.data.resumable import ShuffledSampler
from lrkd.models.teachers import load_tokenizer


def read_records(
    path: str | Path, text_field: str = "text", prompt_field: str = "prompt",
    response_field: str = "response",
) -> Iterator[dict[str, str]]:  # fmt: skip
    """Yield ``{"text": ...}`` or ``{"prompt": ..., "response": ...}`` records from a file.

    Raises:
        ValueError: a malformed line or record, or text that is not UTF-8, naming the file and
            line (or row) number.
        FileNotFoundError: the file does not exist.
    """
    for _, record in located_records(path, text_field, prompt_field, response_field):
        yield record


def located_records(
    path: str | Path, text_field: str = "text", prompt_field: str = "prompt",
    response_field: str = "response",
) -> Iterator[tuple[str, dict[str, str]]]:  # fmt: skip
    """Yield ``(where, record)`` pairs: each record of :func:`read_records` with its place,
    ``"<file>:<line>"`` (``"<file>:<row>"`` in parquet; the file for a ``.txt`` paragraph)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for paragraph in read_utf8(path).split("\n\n"):
            if paragraph.strip():
                yield str(path), {"text": paragraph.strip()}
        return
    if suffix in (".jsonl", ".json"):
        rows: Iterator[tuple[int, Any]] = jsonl_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .parquet")
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if prompt_field in row and response_field in row:
            prompt, response = row[prompt_field], row[response_field]
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise ValueError(
                    f"{where}: {prompt_field!r} and {response_field!r} must be strings"
                )
            yield where, {"prompt": prompt, "response": response}
        elif text_field in row:
            if not isinstance(row[text_field], str):
                raise ValueError(f"{where}: {text_field!r} must be a string")
            yield where, {"text": row[text_field]}
        else:
            raise ValueError(
                f"{where}: record has neither {text_field!r} nor {prompt_field!r}+"
                f"{response_field!r}; its keys are {sorted(row)}"
            )


def jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line number, parsed JSON)`` for every non-blank line of a UTF-8 JSONL file (a
    leading byte-order mark is dropped).

    Raises:
        ValueError: a line that is not JSON, or not UTF-8, naming the file and line number.
    """
    with path.open(encoding="utf-8-sig") as f:
        lines = enumerate(f, start=1)
        while True:
            try:
                line_no, line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError as err:
                raise not_utf8(path) from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({err.msg})") from err
            yield line_no, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from err
    try:
        rows = pq.read_table(path).to_pylist()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: a text column is not UTF-8 ({err.reason}); write it as UTF-8 strings"
        ) from err
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err
    yield from enumerate(rows, start=1)


def resolve_tokenizer(name: str | None) -> Any:
    """The DataModule's tokenizer, loaded from ``name`` (``data.tokenizer``; ``lrkd fit`` sets it
    to ``model.teacher`` when the teacher is given by name and the config leaves it out)."""
    if name is None:
        raise ValueError(
            "data.tokenizer is not set: give the teacher's tokenizer (a built-in name, local "
            "directory or hub id). lrkd fit takes model.teacher when the teacher is given by name."
        )
    return load_tokenizer(name, field="data.tokenizer")


def prompt_token_ids(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt, as a user turn of the tokenizer's chat template (followed by the
    assistant's opening) when ``chat_template`` is set and the tokenizer has one, else as is."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


class PackedText(Dataset):
    """Documents tokenised, joined with EOS and cut into blocks of ``seq_length`` tokens.

    The last partial block is dropped. Every token is a training target.
    """

    def __init__(self, documents: list[str], tokenizer: Any, seq_length: int) -> None:
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        n_blocks = len(stream) // seq_length
        if n_blocks == 0:
            raise ValueError(
                f"the text has {len(stream)} tokens, fewer than one block of seq_length="
                f"{seq_length}; give more text or a shorter data.seq_length"
            )
        self.blocks = torch.tensor(stream[: n_blocks * seq_length]).view(n_blocks, seq_length)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        ones = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}


class Examples(Dataset):
    """Ready examples (dicts of tensors), one per index."""

    def __init__(self, examples: list[dict[str, torch.Tensor]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]


class PromptResponse(Examples):
    """Prompt+response examples in which only the response tokens are training targets.

    Args:
        records: dicts with ``prompt`` and ``response``.
        tokenizer: the teacher's tokenizer.
        seq_length: examples are truncated to this many tokens.
        chat_template: format the prompt as a user turn with the tokenizer's chat template
            (when it has one), so that an instruction-tuned teacher sees what it was trained on.
        overlong: what to do with a record whose prompt leaves no room for a response token
            within ``seq_length``: ``error``, ``drop``, ``truncate_left`` or ``keep`` (see
            :mod:`lrkd.data.overlong`).
    """

    def __init__(
        self, records: list[dict[str, str]], tokenizer: Any, seq_length: int,
        chat_template: bool = True, overlong: str = "error",
    ) -> None:  # fmt: skip
        located = [(f"record {i}", record) for i, record in enumerate(records, start=1)]
        rows = {"records": prompt_response_rows(located, tokenizer, chat_template)}
        super().__init__(fit_prompt_responses(rows, seq_length, overlong)["records"])


Row = tuple[str, list[int], list[int]]
"""A prompt + response record as ``(where, prompt token ids, response token ids)``."""


def prompt_response_rows(
    located: list[tuple[str, dict[str, str]]], tokenizer: Any, chat_template: bool = True
) -> list[Row]:
    """Tokenise ``(where, {"prompt", "response"})`` records into rows."""
    return [
        (where, prompt_token_ids(tokenizer, record["prompt"], chat_template),
         response_token_ids(tokenizer, record["response"]))
        for where, record in located
    ]  # fmt: skip


def fit_prompt_responses(
    rows: dict[str, list[Row]], seq_length: int, overlong: str
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Each split's examples of its rows, ``seq_length`` tokens at most: rows whose prompt leaves
    no room for a response token are refused, dropped or left-truncated by ``overlong`` (all
    splits checked together), and rows cut at ``seq_length`` are counted in a warning."""
    keep = keep_rows(
        {split: [len(p) for _, p, _ in split_rows] for split, split_rows in rows.items()},
        {split: [where for where, _, _ in split_rows] for split, split_rows in rows.items()},
        seq_length, overlong, "records",
        {split: [len(p) + len(r) for _, p, r in split_rows] for split, split_rows in rows.items()},
    )  # fmt: skip
    kept = {split: [rows[split][i] for i in indices] for split, indices in keep.items()}
    warn_long_rows([(len(p), len(r)) for split_rows in kept.values() for _, p, r in split_rows],
                   seq_length, overlong, "records")  # fmt: skip
    return {
        split: [prompt_response_example(*fit_row(p, r, seq_length, overlong), seq_length)
                for _, p, r in split_rows]
        for split, split_rows in kept.items()
    }  # fmt: skip


def response_token_ids(tokenizer: Any, response: str) -> list[int]:
    """Token ids of a response text, closed by the EOS token (a target too)."""
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def prompt_response_example(
    prompt_ids: list[int], response_ids: list[int], seq_length: int | None = None
) -> dict[str, torch.Tensor]:
    """One example of prompt + response tokens in which only the response tokens are targets.

    Returns:
        ``input_ids``, ``attention_mask`` and ``loss_mask`` [L], truncated to ``seq_length``.
    """
    ids = torch.tensor([*prompt_ids, *response_ids][:seq_length], dtype=torch.long)
    loss_mask = torch.zeros_like(ids)
    loss_mask[len(prompt_ids) :] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}


def pad_collate(
    examples: list[dict[str, torch.Tensor]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad examples of different lengths into a batch (pad positions are masked out).
    Each sequence key is padded to its own longest (a teacher's view may be longer)."""
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        if examples[0][key].dim() == 0:
            batch[key] = torch.stack([e[key] for e in examples])
            continue
        length = max(e[key].shape[0] for e in examples)
        fill = pad_token_id if key.endswith("input_ids") else 0
        out = torch.full((len(examples), length), fill, dtype=examples[0][key].dtype)
        for i, e in enumerate(examples):
            out[i, : e[key].shape[0]] = e[key]
        batch[key] = out
    return batch


class TextDataModule(LightningDataModule):
    """Text or prompt+response data from local files, tokenised with the teacher's tokenizer.

    With no ``train_files``, the built-in generated corpus is used (no download).

    Args:
        train_files: ``.txt``, ``.jsonl`` or ``.parquet`` files (see the module docs for the
            record formats). ``None`` uses the built-in corpus.
        val_files: validation files; ``None`` holds out ``val_fraction`` of the training records.
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
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
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
    ) -> None:
        super().__init__()
        check_at_least("data.seq_length", seq_length, 2)
        check_at_least("data.batch_size", batch_size, 1)
        check_fraction("data.val_fraction", val_fraction)
        check_at_least("data.builtin_documents", builtin_documents, 1)
        check_at_least("data.num_workers", num_workers, 0)
        check_choice("data.overlong", overlong, OVERLONG_MODES)
        self.train_files = train_files
        self.val_files = val_files
        self.tokenizer_name = tokenizer
        self.seq_length = seq_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.chat_template = chat_template
        self.fields = {"text_field": text_field, "prompt_field": prompt_field,
                       "response_field": response_field}  # fmt: skip
        self.builtin_documents = builtin_documents
        self.num_workers = num_workers
        self.seed = seed
        self.overlong = overlong
        self.tokenizer: Any = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self._sampler: ShuffledSampler | None = None
        self._restored_sampler: dict[str, Any] | None = None

    def _records(self, files: list[str] | None) -> list[tuple[str, dict[str, str]]]:
        """``(where, record)`` of every record of ``files`` (the built-in corpus for None)."""
        if files is None:
            docs = builtin_corpus(self.builtin_documents, self.seed)
            return [("the built-in corpus", {"text": doc}) for doc in docs]
        return [located for f in files for located in located_records(f, **self.fields)]

    def _datasets(
        self, splits: dict[str, list[tuple[str, dict[str, str]]]]
    ) -> dict[str, Dataset | None]:
        """Each split's dataset (``None`` for a split without records): packed text, or
        prompt+response examples (their overlong rows handled over all splits together)."""
        datasets: dict[str, Dataset | None] = {}
        rows: dict[str, list[Row]] = {}
        for split, located in splits.items():
            records = [record for _, record in located]
            kinds = {"text" if "text" in r else "prompt" for r in records}
            if len(kinds) > 1:
                raise ValueError(
                    "data: the files mix plain-text records and prompt+response records; "
                    "give one kind per DataModule"
                )
            if not records:
                datasets[split] = None
            elif kinds == {"text"}:
                docs = [r["text"] for r in records]
                datasets[split] = PackedText(docs, self.tokenizer, self.seq_length)
            else:
                rows[split] = prompt_response_rows(located, self.tokenizer, self.chat_template)
        if rows:
            examples = fit_prompt_responses(rows, self.seq_length, self.overlong)
            datasets.update({split: Examples(split_examples)
                             for split, split_examples in examples.items()})  # fmt: skip
        return datasets

    def setup(self, stage: str | None = None) -> None:
        """Read, tokenise and split the data (once)."""
        if self.train_dataset is not None:
            return
        if self.tokenizer is None:  # a tokenizer object may be set before setup
            self.tokenizer = resolve_tokenizer(self.tokenizer_name)
        records = self._records(self.train_files)
        if not records:
            raise ValueError(f"data.train_files {self.train_files} hold no records")
        if self.val_files is not None:
            val_records = self._records(self.val_files)
        else:
            random.Random(self.seed).shuffle(records)
            n_val = max(1, int(len(records) * self.val_fraction)) if self.val_fraction else 0
            val_records, records = records[:n_val], records[n_val:]
            if not records:
                raise ValueError(
                    f"data.val_fraction={self.val_fraction} holds out all {n_val} records of "
                    "data.train_files; give more records, data.val_files or val_fraction 0"
                )
        datasets = self._datasets({"train": records, "val": val_records})
        self.train_dataset, self.val_dataset = datasets["train"], datasets["val"]

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
        sampler = ShuffledSampler(self, len(self.train_dataset), self.seed)
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
        if self._restored_sampler:
            sampler.load_state_dict(self._restored_sampler)
            self._restored_sampler = None
        self._sampler = sampler
        return self._loader(self.train_dataset, sampler)

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


def teacher_view(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The teacher's own ``input_ids`` / ``attention_mask`` / ``loss_mask`` of a batch whose
    teacher sees a different prompt (``teacher_*`` keys), or ``None`` when it sees the
    student's sequence."""
    if "teacher_input_ids" not in batch:
        return None
    keys = ("input_ids", "attention_mask", "loss_mask")
    return {key: batch[f"teacher_{key}"] for key in keys if f"teacher_{key}" in batch}
