"""Streamed text (``data.streaming``): blocks packed as the files are read equal the prepared
blocks of the same files in the same order, each process reads its share, a resumed run skips
exactly the blocks it trained on, and settings that cannot work are refused by name."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lrkd.data.corpus import builtin_corpus
from lrkd.data.manifest import PrepareSettings
from lrkd.data.streaming import StreamedBlocks
from lrkd.data.text import TextDataModule
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule

SEQ = 24


def _files(tmp_path: Path, parts: int = 4, per_part: int = 6) -> list[Path]:
    docs = builtin_corpus(parts * per_part, seed=3)
    files = []
    for i in range(parts):
        f = tmp_path / "corpus" / f"part{i}.jsonl"
        f.parent.mkdir(exist_ok=True)
        f.write_text("".join(json.dumps({"text": d}) + "\n"
                             for d in docs[i * per_part : (i + 1) * per_part]))  # fmt: skip
        files.append(f)
    return files


def _reference_blocks(docs: list[str], tokenizer, length: int) -> list[list[int]]:
    stream = [t for d in docs for t in [*tokenizer(d, add_special_tokens=False)["input_ids"],
                                        tokenizer.eos_token_id]]  # fmt: skip
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]


def test_unshuffled_stream_is_the_concatenated_blocks(tmp_path, tiny_tokenizer) -> None:
    files = _files(tmp_path)
    settings = PrepareSettings(seq_length=SEQ)
    stream = StreamedBlocks([str(tmp_path / "corpus")], tiny_tokenizer, settings,
                            shuffle_buffer=0)  # fmt: skip
    docs = [json.loads(line)["text"] for f in files for line in f.read_text().splitlines()]
    expected = _reference_blocks(docs, tiny_tokenizer, SEQ)
    got = [b.tolist() for b in itertools.islice(stream.blocks(), len(expected))]
    assert got == expected
    # Passes repeat without end: the next block starts the second pass (after the carry).
    more = next(itertools.islice(stream.blocks(), len(expected), None))
    assert isinstance(more, torch.Tensor) and more.shape == (SEQ,)


def test_each_process_reads_its_share(tmp_path, tiny_tokenizer) -> None:
    files = _files(tmp_path)
    settings = PrepareSettings(seq_length=SEQ)
    shares = []
    for rank in range(2):
        stream = StreamedBlocks([str(f) for f in files], tiny_tokenizer, settings, rank=rank,
                                world_size=2, shuffle_buffer=0)  # fmt: skip
        shares.append(stream)
    # 4 files over 2 processes: each reads 2 whole files (datasets' split_dataset_by_node).
    for rank, stream in enumerate(shares):
        docs = [json.loads(line)["text"] for f in files[rank::2] for line in
                f.read_text().splitlines()]  # fmt: skip
        expected = _reference_blocks(docs, tiny_tokenizer, SEQ)
        assert [b.tolist() for b in itertools.islice(stream.blocks(), len(expected))] == expected


def test_shuffled_stream_is_deterministic_and_skips(tmp_path, tiny_tokenizer) -> None:
    _files(tmp_path)
    settings = PrepareSettings(seq_length=SEQ, seed=1)
    done = [0]
    stream = StreamedBlocks([str(tmp_path / "corpus")], tiny_tokenizer, settings,
                            shuffle_buffer=5, blocks_done=lambda: done[0])  # fmt: skip
    first = [e["input_ids"].tolist() for e in itertools.islice(iter(stream), 12)]
    assert first == [e["input_ids"].tolist() for e in itertools.islice(iter(stream), 12)]
    unshuffled = StreamedBlocks([str(tmp_path / "corpus")], tiny_tokenizer, settings,
                                shuffle_buffer=0)  # fmt: skip
    assert first != [b.tolist() for b in itertools.islice(unshuffled.blocks(), 12)]
    done[0] = 5
    assert [e["input_ids"].tolist() for e in itertools.islice(iter(stream), 7)] == first[5:]


class _Tokens(Callback):
    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(batch["input_ids"].flatten().tolist())


def _fit(tmp_path: Path, teacher: Path, root: str, steps: int, ckpt: str | None = None):
    data = TextDataModule(train_files=[str(tmp_path / "corpus")], tokenizer=str(teacher),
                          seq_length=SEQ, batch_size=2, streaming=True, shuffle_buffer=4,
                          val_files=[str(tmp_path / "corpus" / "part0.jsonl")],
                          cache_dir=str(tmp_path / "cache"))  # fmt: skip
    module = DistillationModule(
        teacher=str(teacher), teacher_dtype="float32",
        student=FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0),
    )  # fmt: skip
    tokens = _Tokens()
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path / root), val_check_interval=4,
        limit_val_batches=1,
        callbacks=[tokens, ModelCheckpoint(dirpath=tmp_path / root / "ckpt", save_top_k=-1,
                                           every_n_train_steps=1, filename="{step}")],
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return tokens.seen


def test_streaming_run_resumes_exactly(tmp_path, tiny_teacher_dir) -> None:
    _files(tmp_path)
    full = _fit(tmp_path, tiny_teacher_dir, "full", 9)
    _fit(tmp_path, tiny_teacher_dir, "first", 4)
    resumed = _fit(tmp_path, tiny_teacher_dir, "resumed", 9,
                   str(tmp_path / "first" / "ckpt" / "step=4.ckpt"))  # fmt: skip
    assert len(full) == 9 and resumed == full[4:]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "data.streaming reads data.train_files"),
        ({"train_files": ["x.jsonl"], "prepared": "p"}, "data.prepared is given together"),
        ({"train_files": ["x.jsonl"], "num_workers": 2}, "set data.num_workers: 0"),
        ({"train_files": ["x.jsonl"], "shuffle_buffer": -1},
         "data.shuffle_buffer must be at least 0"),
    ],
)  # fmt: skip
def test_streaming_settings_that_cannot_work(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        TextDataModule(streaming=True, **kwargs)


def test_streaming_refuses_mixed_types_and_records_without_text(tmp_path, tiny_tokenizer):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (tmp_path / "b.txt").write_text("doc\n")
    settings = PrepareSettings(seq_length=SEQ)
    with pytest.raises(ValueError, match=r"must all be one of .*got \.jsonl, \.txt"):
        StreamedBlocks([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], tiny_tokenizer,
                       settings)  # fmt: skip
    stream = StreamedBlocks([str(tmp_path / "a.jsonl")], tiny_tokenizer, settings)
    with pytest.raises(ValueError, match=r"no 'text' field \(they have \['prompt', 'response'\]"):
        next(stream.blocks())


def test_streaming_needs_max_steps(tmp_path, tiny_tokenizer) -> None:
    _files(tmp_path)
    dm = TextDataModule(train_files=[str(tmp_path / "corpus")], streaming=True)
    dm.tokenizer = tiny_tokenizer
    dm.trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False)
    with pytest.raises(ValueError, match=r"needs trainer\.max_steps"):
        dm.setup("fit")
