"""Text data: packing, response-only loss masks, file formats and errors, the built-in corpus."""

from __future__ import annotations

import json

import pytest
import torch

from lrkd.data.corpus import builtin_corpus
from lrkd.data.records import read_records
from lrkd.data.text import TextDataModule
from lrkd.data.tokens import pad_collate


def prepared_examples(tmp_path, tokenizer, records, **kwargs):
    """The training examples of ``records`` (dicts, in this order) prepared by a
    TextDataModule with ``kwargs`` (the same file as validation, so that no record is held out
    and the order stays)."""
    f = tmp_path / "records.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = TextDataModule(train_files=[str(f)], val_files=[str(f)],
                        cache_dir=str(tmp_path / "cache"), **kwargs)  # fmt: skip
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm.train_dataset


def test_builtin_corpus_is_deterministic_and_varied() -> None:
    a, b = builtin_corpus(200, seed=3), builtin_corpus(200, seed=3)
    assert a == b
    assert builtin_corpus(200, seed=4) != a
    assert len(set(a)) > 150
    assert any("Question:" in doc for doc in a)


def test_packed_text_blocks(tmp_path, tiny_tokenizer) -> None:
    docs = ["abc", "de"]
    dataset = prepared_examples(tmp_path, tiny_tokenizer, [{"text": d} for d in docs], seq_length=3)
    eos = tiny_tokenizer.eos_token_id
    stream = [*tiny_tokenizer("abc")["input_ids"], eos, *tiny_tokenizer("de")["input_ids"], eos]
    assert len(dataset) == len(stream) // 3 == 2
    assert dataset[0]["input_ids"].tolist() == stream[:3]
    assert dataset[1]["input_ids"].tolist() == stream[3:6]
    assert dataset[0]["loss_mask"].tolist() == [1, 1, 1]


def test_prompt_response_masks_only_response(tmp_path, tiny_tokenizer) -> None:
    records = [{"prompt": "2+2?", "response": "4"}, {"prompt": "hi", "response": "hello"}]
    dataset = prepared_examples(tmp_path, tiny_tokenizer, records, seq_length=64)
    ex = dataset[0]
    text = tiny_tokenizer.decode(ex["input_ids"])
    assert text.startswith("<user>2+2?\n<assistant>")
    targets = ex["input_ids"][ex["loss_mask"].bool()]
    assert tiny_tokenizer.decode(targets) == "4</s>"
    batch = pad_collate([dataset[0], dataset[1]], pad_token_id=tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["loss_mask"].shape == batch["attention_mask"].shape
    short = int(dataset[0]["input_ids"].shape[0])
    assert batch["attention_mask"][0, short:].sum() == 0
    assert batch["loss_mask"][0, short:].sum() == 0
    assert (batch["input_ids"][0, short:] == tiny_tokenizer.pad_token_id).all()
    targets1 = batch["input_ids"][1][batch["loss_mask"][1].bool()]
    assert tiny_tokenizer.decode(targets1) == "hello</s>"


def test_prompt_response_without_template(tmp_path, tiny_tokenizer) -> None:
    dataset = prepared_examples(
        tmp_path,
        tiny_tokenizer,
        [{"prompt": "Q:", "response": "A"}],
        seq_length=64,
        chat_template=False,
    )
    ex = dataset[0]
    assert tiny_tokenizer.decode(ex["input_ids"]) == "Q:A</s>"
    assert ex["loss_mask"].tolist() == [0, 0, 1, 1]


def test_read_records_formats_and_errors(tmp_path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nstill first\n\nsecond doc\n")
    assert [r["text"] for r in read_records(txt)] == ["first doc\nstill first", "second doc"]

    good = tmp_path / "b.jsonl"
    good.write_text(
        json.dumps({"prompt": "p", "response": "r"}) + "\n\n" + json.dumps({"text": "t"}) + "\n"
    )
    assert list(read_records(good)) == [{"prompt": "p", "response": "r"}, {"text": "t"}]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        list(read_records(bad))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"wrong\.jsonl:1: record has neither 'text'"):
        list(read_records(wrong))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        list(read_records(tmp_path / "missing.jsonl"))


def test_datamodule_builtin_corpus(tiny_teacher_dir) -> None:
    dm = TextDataModule(
        tokenizer=str(tiny_teacher_dir), seq_length=32, batch_size=4, builtin_documents=100
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert batch["loss_mask"].dtype == torch.long and batch["loss_mask"].all()
    assert len(dm.val_dataloader()) >= 1


def test_datamodule_rejects_mixed_records(tmp_path, tiny_teacher_dir) -> None:
    f = tmp_path / "mixed.jsonl"
    f.write_text(
        json.dumps({"text": "t"}) + "\n" + json.dumps({"prompt": "p", "response": "r"}) + "\n"
    )
    dm = TextDataModule(train_files=[str(f)], val_files=[str(f)], tokenizer=str(tiny_teacher_dir))
    with pytest.raises(ValueError, match=r"mix plain-text records and prompt"):
        dm.setup("fit")
