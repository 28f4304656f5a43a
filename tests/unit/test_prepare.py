"""``lrkd prepare`` and the prepared data path: every record format gives the same examples,
packing equals a plain Python reference, the number of processes changes nothing, a finished
prepare is never redone and an interrupted one leaves nothing, manifest mismatches are refused
with the exact command that prepares the data again, and the ``lrkd prepare`` command itself."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import make_tokenizer, tiny_llama_config

from lrkd.cli import main
from lrkd.data.corpus import builtin_corpus
from lrkd.data.manifest import MANIFEST, PrepareSettings
from lrkd.data.prepare import prepare
from lrkd.data.prepared import PreparedExamples
from lrkd.data.records import expand_sources
from lrkd.data.text import TextDataModule
from lrkd.data.tokens import pad_collate

# ------------------------------------------------------------------------------------ helpers


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def examples(path: Path, split: str = "train") -> list[tuple[list[int], list[int]]]:
    """``(input_ids, loss_mask)`` of every example of a prepared split, read as the
    DataLoader reads them (one ``__getitems__`` call)."""
    ds = PreparedExamples(path / split)
    batch = ds.__getitems__(list(range(len(ds))))
    for ex in batch:
        assert ex["input_ids"].dtype == ex["loss_mask"].dtype == torch.long
        assert ex["attention_mask"].tolist() == [1] * len(ex["input_ids"])
    return [(ex["input_ids"].tolist(), ex["loss_mask"].tolist()) for ex in batch]


def dm_examples(dataset) -> list[tuple[list[int], list[int]]]:
    return [(dataset[i]["input_ids"].tolist(), dataset[i]["loss_mask"].tolist())
            for i in range(len(dataset))]  # fmt: skip


def doc_ids(tok, doc: str) -> list[int]:
    """A document's tokens closed by EOS, as a plain call of the tokenizer."""
    return [*tok(doc, add_special_tokens=False)["input_ids"], tok.eos_token_id]


def concat_reference(tok, docs: list[str], length: int) -> list[tuple[list[int], list[int]]]:
    """pack="concat" by hand: every document and its EOS concatenated, cut into full blocks,
    the remainder dropped; every token a target."""
    stream = [t for doc in docs for t in doc_ids(tok, doc)]
    n = len(stream) // length * length
    return [(stream[i : i + length], [1] * length) for i in range(0, n, length)]


def documents_reference(tok, docs: list[str], length: int) -> list[tuple[list[int], list[int]]]:
    """pack="documents" by hand: each document and its EOS cut alone into pieces of at most
    ``length`` tokens; pieces of one token left out."""
    blocks = []
    for doc in docs:
        ids = doc_ids(tok, doc)
        for i in range(0, len(ids), length):
            if len(ids[i : i + length]) > 1:
                blocks.append((ids[i : i + length], [1] * len(ids[i : i + length])))
    return blocks


def pairs_reference(tok, records: list[dict], length: int, chat_template: bool = True):
    """Prompt+response examples by hand, for the tiny tokenizer (one token per character; its
    chat template is ``<user>PROMPT\\n<assistant>``): prompt then response and EOS, cut to
    ``length``, only the response a target."""
    out = []
    for r in records:
        prompt = f"<user>{r['prompt']}\n<assistant>" if chat_template else r["prompt"]
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = [*p, *doc_ids(tok, r["response"])]
        out.append((ids[:length], ([0] * len(p) + [1] * (len(ids) - len(p)))[:length]))
    return out


def settings(**kwargs) -> PrepareSettings:
    return PrepareSettings(**kwargs)


def text_docs(n: int = 40, seed: int = 5) -> list[str]:
    """Built-in corpus documents of one paragraph (as a .txt file can hold them), plus one with
    non-ASCII text and one with a line break."""
    docs = [d for d in builtin_corpus(n, seed=seed) if "\n\n" not in d]
    assert len(docs) > n // 2 and all(d == d.strip() for d in docs)
    return [*docs, "café ünïcode déjà vu", "line one\nline two"]


def pair_records(n: int = 40) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "response": str(2 * i), "id": i}
            for i in range(n)]  # fmt: skip


def reprepare_args(message: str, out: Path) -> list[str]:
    """The ``lrkd prepare --like OUT ...`` command an error ends with, as ``main``'s argv."""
    command = shlex.split(message.split("re-prepare: ", 1)[1])
    assert command[:4] == ["lrkd", "prepare", "--like", str(out)], message
    return command[1:]


def tokenizer_dir(path: Path, extra_tokens: list[str]) -> Path:
    """A model directory (config only) whose tokenizer is the tiny one plus ``extra_tokens``."""
    tok = make_tokenizer()
    tok.add_tokens(extra_tokens)
    tok.save_pretrained(path)
    tiny_llama_config(vocab_size=len(tok)).save_pretrained(path)
    return path


# -------------------------------------------------------------------------------- 1. formats


def write_format(fmt: str, records: list[dict], root: Path) -> Path:
    """``records`` written as ``fmt``; the path to give as a source."""
    root.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records)
    if fmt == "jsonl":
        return write_jsonl(root / "records.jsonl", records)
    if fmt == "json_array":
        path = root / "records.json"
        path.write_text(json.dumps(records, indent=2))
        return path
    if fmt == "txt":
        path = root / "records.txt"
        path.write_text("\n\n".join(r["text"] for r in records) + "\n")
        return path
    if fmt == "parquet":
        path = root / "records.parquet"
        pq.write_table(table, path, row_group_size=5)  # several batches
        return path
    if fmt in ("arrow_stream", "arrow_file"):
        path = root / "records.arrow"
        new = pa.ipc.new_stream if fmt == "arrow_stream" else pa.ipc.new_file
        with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=4)
        return path
    if fmt == "saved_dataset":
        from datasets import Dataset

        Dataset.from_list(records).save_to_disk(str(root / "saved"))
        return root / "saved"
    if fmt == "saved_dataset_dict":
        from datasets import Dataset, DatasetDict

        other = [dict(records[0])] * 3
        DatasetDict({"test": Dataset.from_list(other), "train": Dataset.from_list(records)}
                    ).save_to_disk(str(root / "saved_dict"))  # fmt: skip
        return root / "saved_dict"
    if fmt == "directory":
        # name order: 1.jsonl < 10.json < 2-sub/a.parquet < 2-sub/b.arrow < 3-saved < 9.*
        d = root / "dir"
        (d / "2-sub").mkdir(parents=True)
        write_format("jsonl", records[:5], d / "tmp1").rename(d / "1.jsonl")
        write_format("json_array", records[5:12], d / "tmp10").rename(d / "10.json")
        write_format("parquet", records[12:20], d / "tmp2").rename(d / "2-sub" / "a.parquet")
        write_format("arrow_file", records[20:26], d / "tmp2b").rename(d / "2-sub" / "b.arrow")
        write_format("saved_dataset", records[26:32], d / "tmp3").rename(d / "3-saved")
        last = "txt" if "text" in records[0] else "jsonl"
        write_format(last, records[32:], d / "tmp9").rename(d / f"9.{last}")
        for tmp in d.glob("tmp*"):
            tmp.rmdir()
        (d / "README.md").write_text("not data\n")
        (d / "2-sub" / "notes.csv").write_text("a,b\n1,2\n")
        return d
    raise AssertionError(fmt)


FORMATS = ["jsonl", "json_array", "parquet", "arrow_stream", "arrow_file", "saved_dataset",
           "saved_dataset_dict", "directory"]  # fmt: skip


@pytest.mark.parametrize("kind", ["text", "prompt_response"])
def test_every_format_gives_the_same_examples(kind, tmp_path, tiny_tokenizer) -> None:
    if kind == "text":
        records = [{"text": d, "id": i} for i, d in enumerate(text_docs())]
        length, formats = 16, [*FORMATS, "txt"]
        reference = concat_reference(tiny_tokenizer, [r["text"] for r in records], length)
        val = [{"text": "held out"}]
    else:
        records, length, formats = pair_records(), 48, FORMATS
        reference = pairs_reference(tiny_tokenizer, records, length)
        val = [{"prompt": "held", "response": "out"}]
    val_file = write_jsonl(tmp_path / "val.jsonl", val)
    results = {}
    for fmt in formats:
        source = write_format(fmt, records, tmp_path / fmt)
        out = prepare([str(source)], tmp_path / "out" / fmt, tiny_tokenizer,
                      settings(seq_length=length), val_files=[str(val_file)])  # fmt: skip
        results[fmt] = examples(out)
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["kind"] == kind
        assert manifest["splits"]["train"]["records"] == len(records), fmt
    assert results["jsonl"] == reference
    for fmt, got in results.items():
        assert got == reference, fmt


def test_a_directory_is_read_recursively_in_name_order(tmp_path) -> None:
    d = write_format("directory", [{"text": f"doc {i}"} for i in range(40)], tmp_path)
    assert [str(p.relative_to(d)) for p in expand_sources([str(d)])] == [
        "1.jsonl", "10.json", "2-sub/a.parquet", "2-sub/b.arrow", "3-saved", "9.txt"
    ]  # fmt: skip


def test_a_saved_dataset_dict_without_train_names_its_splits(tmp_path, tiny_tokenizer) -> None:
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_list([{"text": "a b c d e f"}] * 4)
    DatasetDict({"validation": rows, "test": rows}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"without a 'train' split.*\['test', 'validation'\]"):
        prepare([str(tmp_path / "dd")], tmp_path / "out", tiny_tokenizer, settings(seq_length=4))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 2. packing


def test_concat_blocks_equal_a_plain_reference(tmp_path, tiny_tokenizer) -> None:
    docs = builtin_corpus(200, seed=1)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    out = prepare([str(src)], tmp_path / "out", tiny_tokenizer, settings(seq_length=29),
                  val_files=[str(src)])  # fmt: skip
    got = examples(out)
    reference = concat_reference(tiny_tokenizer, docs, 29)
    assert len(reference) > 100
    assert got == reference
    assert examples(out, "val") == reference
    # one example at a time reads the same as a batch
    ds = PreparedExamples(out / "train")
    assert [ds[i]["input_ids"].tolist() for i in (0, 57, len(ds) - 1)] == [
        reference[0][0], reference[57][0], reference[-1][0]
    ]  # fmt: skip
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["splits"]["train"]["tokens"] == 29 * len(reference)
    assert manifest["token_type"] == "uint16"


def test_concat_blocks_across_the_batch_boundary(tmp_path, tiny_tokenizer) -> None:
    """More than 1000 documents: the packer carries the remainder of one batch of 1000 into
    the next, so the blocks are those of one concatenation."""
    docs = [f"n{i}" + "x" * (i % 5) for i in range(2500)]
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": "held out"}])
    out = prepare([str(src)], tmp_path / "out", tiny_tokenizer, settings(seq_length=7),
                  val_files=[str(val)])  # fmt: skip
    reference = concat_reference(tiny_tokenizer, docs, 7)
    stream_length = sum(len(doc_ids(tiny_tokenizer, d)) for d in docs)
    assert stream_length % 7 != 0  # a remainder is dropped
    assert len(reference) == stream_length // 7
    assert examples(out) == reference


def test_documents_pack_keeps_documents_apart(tmp_path, tiny_tokenizer) -> None:
    length = 16
    docs = [*builtin_corpus(200, seed=2), "x" * (length - 1), "y" * length, "", "z"]
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    out = prepare([str(src)], tmp_path / "out", tiny_tokenizer,
                  settings(seq_length=length, pack="documents"), val_files=[str(src)])  # fmt: skip
    got = examples(out)
    assert got == documents_reference(tiny_tokenizer, docs, length)
    eos = tiny_tokenizer.eos_token_id
    for ids, _ in got:
        assert 1 < len(ids) <= length
        assert eos not in ids[:-1]  # a block ends its document or is inside one
    # "x" * 15 + EOS fills one block; "y" * 16 + EOS leaves an EOS alone, dropped; "" too
    assert ([tiny_tokenizer.convert_tokens_to_ids("x")] * 15 + [eos], [1] * 16) in got
    assert [tiny_tokenizer.convert_tokens_to_ids("y")] * 16 in [ids for ids, _ in got]
    assert [eos] not in [ids for ids, _ in got]
    assert [tiny_tokenizer.convert_tokens_to_ids("z"), eos] in [ids for ids, _ in got]

    ds = PreparedExamples(out / "train")
    short = next(i for i in range(len(ds)) if len(ds[i]["input_ids"]) < length)
    full = next(i for i in range(len(ds)) if len(ds[i]["input_ids"]) == length)
    n = len(ds[short]["input_ids"])
    pad = tiny_tokenizer.pad_token_id
    batch = pad_collate(ds.__getitems__([short, full]), pad_token_id=pad)
    assert batch["input_ids"].shape == (2, length)
    assert batch["input_ids"][0, :n].tolist() == ds[short]["input_ids"].tolist()
    assert batch["input_ids"][0, n:].tolist() == [pad] * (length - n)
    for key in ("attention_mask", "loss_mask"):
        assert batch[key][0].tolist() == [1] * n + [0] * (length - n)
        assert batch[key][1].tolist() == [1] * length


# --------------------------------------------------------------------------- 3. processes


@pytest.mark.parametrize("kind", ["text", "prompt_response"])
def test_two_processes_give_the_same_examples(kind, tmp_path, tiny_tokenizer, capfd) -> None:
    """Four files (read by two processes) of 2800 records (over 2 * 1000 in the training
    split, so the tokenising map runs in two processes too)."""
    if kind == "text":
        records = [{"text": d} for d in builtin_corpus(2800, seed=4)]
        chosen = settings(seq_length=37)
    else:
        records = [{"prompt": f"Sum {i} and {i % 7}.", "response": str(i + i % 7)}
                   for i in range(2800)]  # fmt: skip
        chosen = settings(seq_length=32, chat_template=False)
    files = [str(write_jsonl(tmp_path / f"part{k}.jsonl", records[k * 700 : (k + 1) * 700]))
             for k in range(4)]  # fmt: skip
    one = prepare(files, tmp_path / "one", tiny_tokenizer, chosen, num_proc=1)
    capfd.readouterr()
    two = prepare(files, tmp_path / "two", tiny_tokenizer, chosen, num_proc=2)
    assert "tokenising train (num_proc=2)" in capfd.readouterr().err
    assert json.loads((two / MANIFEST).read_text())["num_proc"] == 2
    for split in ("train", "val"):
        got = examples(two, split)
        assert len(got) > 100
        assert got == examples(one, split), split
    if kind == "text":  # and both are the reference of the seeded hold-out
        order = list(range(len(records)))
        random.Random(0).shuffle(order)
        train = [records[i]["text"] for i in order[140:]]
        assert examples(two) == concat_reference(tiny_tokenizer, train, 37)


# ------------------------------------------------------------------- 4. done once, atomically


def test_a_second_prepare_does_not_rewrite(tmp_path, tiny_tokenizer) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in builtin_corpus(100)])
    out = prepare([str(src)], tmp_path / "out", tiny_tokenizer, settings(seq_length=16))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    start = time.perf_counter()
    assert prepare([str(src)], out, tiny_tokenizer, settings(seq_length=16)) == out
    assert time.perf_counter() - start < 2.0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_other_settings_into_the_same_out_need_overwrite(tmp_path, tiny_tokenizer) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in builtin_corpus(100)])
    out = prepare([str(src)], tmp_path / "out", tiny_tokenizer, settings(seq_length=16))
    first = examples(out)
    refused = r"--out .*out holds a prepared dataset made from other .*--overwrite"
    with pytest.raises(ValueError, match=refused):
        prepare([str(src)], out, tiny_tokenizer, settings(seq_length=8))
    assert examples(out) == first
    prepare([str(src)], out, tiny_tokenizer, settings(seq_length=8), overwrite=True)
    assert json.loads((out / MANIFEST).read_text())["settings"]["seq_length"] == 8
    fresh = prepare([str(src)], tmp_path / "fresh", tiny_tokenizer, settings(seq_length=8))
    assert examples(out) == examples(fresh) and examples(out)[0][0] != first[0][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "fresh", "out"]


def test_out_holding_other_files_is_refused(tmp_path, tiny_tokenizer) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in builtin_corpus(20)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"--out .*out exists and is not a prepared dataset"):
        prepare([str(src)], tmp_path / "out", tiny_tokenizer, settings(seq_length=8))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_an_interrupted_prepare_leaves_nothing(num_proc, tmp_path, tiny_tokenizer) -> None:
    """A malformed record late in the second file: the error names file and line, also when
    the files are read by two processes, and neither ``out`` nor a staging directory stays."""
    data = tmp_path / "data"
    a = write_jsonl(data / "a.jsonl", [{"text": f"first {i}"} for i in range(300)])
    b = write_jsonl(data / "b.jsonl", [{"text": f"second {i}"} for i in range(250)])
    b.write_text(b.read_text() + '{"text": "almost"\n' + json.dumps({"text": "after"}) + "\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{b}:251: malformed JSON")):
        prepare([str(a), str(b)], tmp_path / "out", tiny_tokenizer, settings(seq_length=8),
                num_proc=num_proc)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert sorted(p.name for p in data.iterdir()) == ["a.jsonl", "b.jsonl"]


def test_a_dead_prepare_staging_directory_is_removed(tmp_path, tiny_tokenizer) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in builtin_corpus(20)])
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {
        "dead": tmp_path / f".out.partial-{host}-{dead.pid}",
        # a restarted container may give this process the id of the killed one
        "this process": tmp_path / f".out.partial-{host}-{os.getpid()}",
    }
    alive = tmp_path / f".out.partial-{host}-{os.getppid()}"  # a running prepare: kept
    elsewhere = tmp_path / ".out.partial-otherhost-1"  # another host's: kept
    for path in [*stale.values(), alive, elsewhere]:
        (path / "train").mkdir(parents=True)
        (path / "train" / "data.arrow").write_bytes(b"half written")
    out = prepare([str(src)], tmp_path / "out", tiny_tokenizer, settings(seq_length=8))
    for what, path in stale.items():
        assert not path.exists(), what
    assert alive.exists() and elsewhere.exists()
    assert (out / MANIFEST).is_file()


# --------------------------------------------------------------------- 5. manifest checks


def cli_prepare(tmp_path: Path, teacher: Path, records: list[dict], *args: str) -> Path:
    src = write_jsonl(tmp_path / "src" / "records.jsonl", records)
    return main(["prepare", "--train_files", str(src), "--tokenizer", str(teacher),
                 "--out", str(tmp_path / "prepared"), *args])  # fmt: skip


def prepared_module(out: Path, tokenizer: Path, tmp_path: Path, **kwargs) -> TextDataModule:
    return TextDataModule(prepared=str(out), tokenizer=str(tokenizer),
                          cache_dir=str(tmp_path / "cache"), **kwargs)  # fmt: skip


def test_another_tokenizer_is_refused_and_reprepared(tmp_path, tiny_teacher_dir) -> None:
    docs = builtin_corpus(60)
    out = cli_prepare(tmp_path, tiny_teacher_dir, [{"text": d} for d in docs],
                      "--seq_length", "16")  # fmt: skip
    other = tokenizer_dir(tmp_path / "other_tok", ["the"])
    dm = prepared_module(out, other, tmp_path, seq_length=16)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert f"was tokenised with {str(tiny_teacher_dir)!r}" in message
    assert f"lrkd prepare --like {out} --tokenizer {other}" in message
    main(reprepare_args(message, out))
    dm = prepared_module(out, other, tmp_path, seq_length=16)
    dm.setup("fit")
    # the added token is used now: the blocks are the other tokenizer's
    from transformers import AutoTokenizer

    other_tok = AutoTokenizer.from_pretrained(other)
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    train = [docs[i] for i in order[max(1, int(len(docs) * 0.05)) :]]
    got = dm_examples(dm.train_dataset)
    assert got == concat_reference(other_tok, train, 16)
    the = other_tok.convert_tokens_to_ids("the")
    assert the == 101 and any(the in ids for ids, _ in got)  # one token now, not three


def test_another_seq_length_is_refused_and_reprepared(tmp_path, tiny_teacher_dir) -> None:
    out = cli_prepare(tmp_path, tiny_teacher_dir, [{"text": d} for d in builtin_corpus(60)],
                      "--seq_length", "16")  # fmt: skip
    dm = prepared_module(out, tiny_teacher_dir, tmp_path, seq_length=32)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert message.startswith("data.seq_length=32, but ")
    assert "set data.seq_length: 16" in message
    assert f"lrkd prepare --like {out} --seq_length 32" in message
    main(reprepare_args(message, out))
    dm = prepared_module(out, tiny_teacher_dir, tmp_path, seq_length=32)
    dm.setup("fit")
    assert {len(ids) for ids, _ in dm_examples(dm.train_dataset)} == {32}


@pytest.mark.parametrize("change", ["same size", "other size"])
def test_a_changed_source_is_refused_and_reprepared(change, tmp_path, tiny_teacher_dir) -> None:
    docs = [f"document number {i:03d} of the set" for i in range(80)]
    out = cli_prepare(tmp_path, tiny_teacher_dir, [{"text": d} for d in docs], "--val_fraction",
                      "0", "--seq_length", "16")  # fmt: skip
    src = tmp_path / "src" / "records.jsonl"
    size, mtime = src.stat().st_size, src.stat().st_mtime_ns
    new_docs = [d.replace("document", "DOCUMENT" if change == "same size" else "doc")
                for d in docs]  # fmt: skip
    write_jsonl(src, [{"text": d} for d in new_docs])
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))  # a later write, however coarse the clock
    assert (src.stat().st_size == size) == (change == "same size")
    dm = prepared_module(out, tiny_teacher_dir, tmp_path, seq_length=16)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    what = "changed content" if change == "same size" else "changed size"
    assert f"source {src} {what}" in message
    assert message.endswith(f"re-prepare: lrkd prepare --like {out}")
    main(reprepare_args(message, out))
    dm = prepared_module(out, tiny_teacher_dir, tmp_path, seq_length=16)
    dm.setup("fit")
    tok = make_tokenizer()
    order = list(range(len(new_docs)))
    random.Random(0).shuffle(order)
    expected = concat_reference(tok, [new_docs[i] for i in order], 16)
    assert dm_examples(dm.train_dataset) == expected


def test_a_source_touched_but_unchanged_is_accepted(tmp_path, tiny_teacher_dir) -> None:
    out = cli_prepare(tmp_path, tiny_teacher_dir, [{"text": d} for d in builtin_corpus(40)],
                      "--seq_length", "16")  # fmt: skip
    src = tmp_path / "src" / "records.jsonl"
    src.write_bytes(src.read_bytes())
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    dm = prepared_module(out, tiny_teacher_dir, tmp_path, seq_length=16)
    dm.setup("fit")
    assert dm_examples(dm.train_dataset) == examples(out)


def test_a_deleted_source_is_not_an_error(tmp_path, tiny_teacher_dir) -> None:
    out = cli_prepare(tmp_path, tiny_teacher_dir, [{"text": d} for d in builtin_corpus(40)],
                      "--seq_length", "16")  # fmt: skip
    expected = examples(out)
    (tmp_path / "src" / "records.jsonl").unlink()
    dm = prepared_module(out, tiny_teacher_dir, tmp_path, seq_length=16)
    dm.setup("fit")
    assert dm_examples(dm.train_dataset) == expected
    assert len(dm.val_dataset) == len(examples(out, "val")) > 0


def test_a_chat_template_mismatch_is_refused_and_reprepared(tmp_path, tiny_teacher_dir) -> None:
    records = pair_records(30)
    out = cli_prepare(tmp_path, tiny_teacher_dir, records, "--seq_length", "48",
                      "--val_fraction", "0")  # fmt: skip
    dm = prepared_module(out, tiny_teacher_dir, tmp_path, seq_length=48, chat_template=False)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert message.startswith("data.chat_template=False, but ")
    assert f"lrkd prepare --like {out} --chat_template false" in message
    main(reprepare_args(message, out))
    dm = prepared_module(out, tiny_teacher_dir, tmp_path, seq_length=48, chat_template=False)
    dm.setup("fit")
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    expected = pairs_reference(make_tokenizer(), [records[i] for i in order], 48, False)
    assert dm_examples(dm.train_dataset) == expected
    # text data is the same with or without a chat template: no mismatch
    text = cli_prepare(tmp_path / "t", tiny_teacher_dir, [{"text": d} for d in builtin_corpus(9)],
                       "--seq_length", "8")  # fmt: skip
    prepared_module(text, tiny_teacher_dir, tmp_path, seq_length=8, chat_template=False).setup()


def test_a_directory_without_manifest_says_how_to_prepare(tmp_path, tiny_teacher_dir) -> None:
    (tmp_path / "half" / "train").mkdir(parents=True)
    dm = prepared_module(tmp_path / "half", tiny_teacher_dir, tmp_path, seq_length=16)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "is not a prepared dataset (no manifest.json" in message
    assert message.endswith(
        f"lrkd prepare --train_files FILES --tokenizer TEACHER --out {tmp_path / 'half'}"
    )


# --------------------------------------------------------------------- 6. the prepare command


def test_cli_train_files_as_one_path_or_a_list(tmp_path, tiny_teacher_dir) -> None:
    docs = [f"text number {i} " + "abc" * (i % 4) for i in range(120)]
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs[:70]])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in docs[70:]])
    common = ["--tokenizer", str(tiny_teacher_dir), "--seq_length", "12", "--val_fraction", "0"]
    one = main(["prepare", "--train_files", str(a), "--out", str(tmp_path / "one"), *common])
    both = main(["prepare", "--train_files", f"[{a}, {b}]", "--out", str(tmp_path / "both"),
                 *common])  # fmt: skip
    assert one == tmp_path / "one" and both == tmp_path / "both"
    tok = make_tokenizer()
    for out, chosen in ((one, docs[:70]), (both, docs)):
        order = list(range(len(chosen)))
        random.Random(0).shuffle(order)
        assert examples(out) == concat_reference(tok, [chosen[i] for i in order], 12)
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["tokenizer"]["name"] == str(tiny_teacher_dir)
    sources = json.loads((both / MANIFEST).read_text())["sources"]["train"]
    assert [s["path"] for s in sources] == [str(a), str(b)]


def test_cli_fit_config_gives_the_settings_and_tokenizer(tmp_path, tiny_teacher_dir) -> None:
    docs = builtin_corpus(80, seed=9)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": d} for d in docs[:10]])
    config = {
        "model": {"teacher": str(tiny_teacher_dir)},
        "data": {"class_path": "lrkd.data.text.TextDataModule",
                 "init_args": {"train_files": [str(src)], "val_files": [str(val)],
                               "seq_length": 24, "pack": "documents", "batch_size": 4,
                               "cache_dir": str(tmp_path / "cache")}},
    }  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    out = main(["prepare", "--fit_config", str(path), "--out", str(tmp_path / "out")])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["seq_length"] == 24 and manifest["settings"]["pack"] == "documents"
    assert manifest["tokenizer"]["name"] == str(tiny_teacher_dir)
    tok = make_tokenizer()
    assert examples(out) == documents_reference(tok, docs, 24)
    assert examples(out, "val") == documents_reference(tok, docs[:10], 24)
    # a flag overrides the config
    out2 = main(["prepare", "--fit_config", str(path), "--out", str(tmp_path / "out2"),
                 "--pack", "concat"])  # fmt: skip
    assert examples(out2) == concat_reference(tok, docs, 24)
    # a config that trains on prepared data already has nothing to prepare
    config["data"]["init_args"] = {"prepared": str(out), "seq_length": 24}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"--fit_config .*fit\.yaml: its data\.prepared is set"):
        main(["prepare", "--fit_config", str(path), "--out", str(tmp_path / "out3")])


def test_cli_like_takes_sources_and_settings(tmp_path, tiny_teacher_dir) -> None:
    records = pair_records(50)
    first = cli_prepare(tmp_path, tiny_teacher_dir, records, "--seq_length", "40",
                        "--chat_template", "false", "--val_fraction", "0.1",
                        "--seed", "3")  # fmt: skip
    second = main(["prepare", "--like", str(first), "--out", str(tmp_path / "second"),
                   "--seq_length", "20", "--overlong", "drop"])  # fmt: skip
    a = json.loads((first / MANIFEST).read_text())
    b = json.loads((second / MANIFEST).read_text())
    assert b["sources"] == a["sources"] and b["tokenizer"] == a["tokenizer"]
    assert {k: v for k, v in b["settings"].items() if k not in ("seq_length", "overlong")} == {
        k: v for k, v in a["settings"].items() if k not in ("seq_length", "overlong")
    }  # fmt: skip
    assert (b["settings"]["seq_length"], b["settings"]["overlong"]) == (20, "drop")
    chosen = settings(seq_length=20, chat_template=False, val_fraction=0.1, seed=3,
                      overlong="drop")  # fmt: skip
    direct = prepare([str(tmp_path / "src" / "records.jsonl")], tmp_path / "direct",
                     make_tokenizer(), chosen)  # fmt: skip
    for split in ("train", "val"):
        assert examples(second, split) == examples(direct, split)
    # --like without --out prepares the directory again in place, unchanged
    mtime = (first / MANIFEST).stat().st_mtime_ns
    assert main(["prepare", "--like", str(first)]) == first
    assert (first / MANIFEST).stat().st_mtime_ns == mtime


def test_cli_like_reads_a_source_directory_afresh(tmp_path, tiny_teacher_dir) -> None:
    """A directory given as a source is listed again by --like: files added since are read."""
    src = tmp_path / "dir"
    write_jsonl(src / "a.jsonl", [{"text": d} for d in builtin_corpus(30, seed=1)])
    first = main(["prepare", "--train_files", str(src), "--tokenizer", str(tiny_teacher_dir),
                  "--seq_length", "16", "--out", str(tmp_path / "first")])  # fmt: skip
    write_jsonl(src / "b.jsonl", [{"text": d} for d in builtin_corpus(30, seed=2)])
    again = main(["prepare", "--like", str(first), "--out", str(tmp_path / "again")])
    listed = [Path(e["path"]).name for e in json.loads((again / MANIFEST).read_text())
              ["sources"]["train"]]  # fmt: skip
    assert listed == ["a.jsonl", "b.jsonl"]
    direct = prepare([str(src)], tmp_path / "direct", make_tokenizer(), settings(seq_length=16))
    assert examples(again) == examples(direct)


def test_prepare_warnings_are_kept_and_repeated(tmp_path, tiny_teacher_dir, caplog) -> None:
    records = [{"prompt": "p" * 30, "response": "r"}, {"prompt": "q", "response": "s" * 40},
               *({"prompt": "hi", "response": "yo"} for _ in range(8))]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        out = cli_prepare(tmp_path, tiny_teacher_dir, records, "--seq_length", "20",
                          "--chat_template", "false", "--overlong", "drop",
                          "--val_fraction", "0")  # fmt: skip
    warnings = json.loads((out / MANIFEST).read_text())["warnings"]
    assert len(warnings) == 2
    assert "data.overlong=drop, data.seq_length=20: 1 of 10 records" in warnings[0]
    assert "1 of 9 records are longer than data.seq_length=20 (longest 42 tokens)" in warnings[1]
    caplog.clear()
    dm = prepared_module(out, tiny_teacher_dir, tmp_path, seq_length=20, chat_template=False,
                         overlong="drop")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        dm.setup("fit")
    repeated = [r.getMessage() for r in caplog.records if r.name == "lrkd"]
    assert repeated == [f"{w} (prepared in {out})" for w in warnings]


# -------------------------------------------------------------------- 7. the built-in corpus


def test_builtin_corpus_equals_the_earlier_in_memory_split(tmp_path, tiny_teacher_dir) -> None:
    n, seed, val_fraction, length = 300, 3, 0.1, 32
    kwargs = dict(tokenizer=str(tiny_teacher_dir), builtin_documents=n, seed=seed,
                  val_fraction=val_fraction, seq_length=length,
                  cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm = TextDataModule(**kwargs)
    dm.setup("fit")
    records = builtin_corpus(n, seed)
    random.Random(seed).shuffle(records)
    n_val = max(1, int(len(records) * val_fraction))
    tok = make_tokenizer()
    assert dm_examples(dm.train_dataset) == concat_reference(tok, records[n_val:], length)
    assert dm_examples(dm.val_dataset) == concat_reference(tok, records[:n_val], length)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, length) and batch["loss_mask"].all()
    # a second DataModule reads the same cache entry without preparing again
    (entry,) = (tmp_path / "cache").iterdir()
    mtime = (entry / MANIFEST).stat().st_mtime_ns
    again = TextDataModule(**kwargs)
    again.setup("fit")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]
    assert (entry / MANIFEST).stat().st_mtime_ns == mtime
    assert dm_examples(again.val_dataset) == dm_examples(dm.val_dataset)
    # another seed is another entry with other documents
    other = TextDataModule(**{**kwargs, "seed": seed + 1})
    other.setup("fit")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert dm_examples(other.val_dataset) != dm_examples(dm.val_dataset)


def test_raw_files_are_cached_by_content(tmp_path, tiny_teacher_dir) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in builtin_corpus(60)])
    kwargs = dict(train_files=[str(src)], tokenizer=str(tiny_teacher_dir), seq_length=16,
                  cache_dir=str(tmp_path / "cache"))  # fmt: skip
    first = TextDataModule(**kwargs)
    first.setup("fit")
    write_jsonl(src, [{"text": d.upper()} for d in builtin_corpus(60)])
    second = TextDataModule(**kwargs)
    second.setup("fit")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    docs = [d.upper() for d in builtin_corpus(60)]
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    expected = concat_reference(make_tokenizer(), [docs[i] for i in order[3:]], 16)
    assert dm_examples(second.train_dataset) == expected
    assert dm_examples(first.train_dataset) != expected


def test_too_little_text_for_one_block(tmp_path, tiny_teacher_dir, caplog) -> None:
    """Validation text shorter than one block: a warning (kept in the manifest) and no
    validation; training text that short: an error naming seq_length."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in builtin_corpus(30)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "tiny"}])
    kwargs = dict(tokenizer=str(tiny_teacher_dir), seq_length=16,
                  cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm = TextDataModule(train_files=[str(train)], val_files=[str(val)], **kwargs)
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        dm.setup("fit")
    assert dm.val_dataset is None and dm.val_dataloader() == []
    assert dm_examples(dm.train_dataset) == concat_reference(
        make_tokenizer(), builtin_corpus(30), 16
    )  # fmt: skip
    message = "the validation text has fewer tokens than one block of seq_length=16"
    assert any(message in w for w in dm.manifest["warnings"])
    assert any(message in r.getMessage() for r in caplog.records)
    short = TextDataModule(train_files=[str(val)], val_files=[str(val)], **kwargs)
    with pytest.raises(ValueError, match=r"training text has fewer tokens than one block of "
                                         r"seq_length=16"):  # fmt: skip
        short.setup("fit")
