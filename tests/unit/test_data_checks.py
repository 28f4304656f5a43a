"""Nothing bad passes silently in the data: prompts that leave no response token within
``seq_length`` (``data.overlong``), files that are not UTF-8, and out-of-range DataModule
arguments, each error naming the config field or the file."""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

import pytest
from conftest import make_tokenizer, tiny_paced_datamodule
from test_data import prepared_examples

from lrkd.data.datamodule import DistillDataModule
from lrkd.data.overlong import fit_row
from lrkd.data.paced_settings import Pacing, Rollouts, TeacherResponses, Validation
from lrkd.data.problems import builtin_problems, read_problems
from lrkd.data.records import read_records
from lrkd.data.text import TextDataModule
from lrkd.data.tokens import prompt_token_ids

S = 16  # seq_length of the hand-made records below (one token per character)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _reference(prompt: list[int], response: list[int], seq_length: int) -> list[int]:
    """truncate_left by hand: the response whole (its first seq_length - 1 tokens at most)
    after as many of the prompt's last tokens as fill the row."""
    response = response[: seq_length - 1]
    return prompt[len(prompt) - (seq_length - len(response)) :] + response


# ------------------------------------------------------------------- TextDataModule: overlong

# prompt, response lengths in characters (the tokenizer adds EOS to each response)
TRAIN = [(5, 3), (20, 2), (10, 10), (16, 1), (3, 20)]  # lines 2 and 4 are overlong at S = 16
VAL = [(30, 1), (1, 1)]  # line 1 is overlong


# distinct characters (tokens) at every position, so that a wrong cut cannot pass by accident
PROMPT_CHARS = string.ascii_letters
RESPONSE_CHARS = string.digits + "!#$%&()*+,-./:;<=>?@"


def _record(p: int, r: int) -> dict[str, str]:
    return {"prompt": PROMPT_CHARS[:p], "response": RESPONSE_CHARS[:r]}


def _text_files(tmp_path: Path) -> tuple[Path, Path]:
    train = _jsonl(tmp_path / "train.jsonl", [_record(p, r) for p, r in TRAIN])
    return train, _jsonl(tmp_path / "val.jsonl", [_record(p, r) for p, r in VAL])


def _text_module(tmp_path, tokenizer, overlong: str = "error") -> TextDataModule:
    train, val = _text_files(tmp_path)
    dm = TextDataModule(train_files=[str(train)], val_files=[str(val)], seq_length=S,
                        chat_template=False, overlong=overlong,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.tokenizer = tokenizer
    return dm


def test_text_overlong_prompts_are_an_error_naming_count_file_and_length(
    tmp_path, tiny_tokenizer
) -> None:
    dm = _text_module(tmp_path, tiny_tokenizer)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.seq_length=16: 3 of 7 records (2 train, 1 val) have a prompt")
    assert "e.g. train.jsonl:2)" in message
    # the longest prompt is 30 tokens: 31 leaves one response token; 30 + 1 + EOS fits whole
    assert "set data.seq_length >= 31 (32 keeps every response whole)" in message
    assert "data.overlong: drop or truncate_left" in message


def test_text_overlong_drop_leaves_those_records_out_with_a_warning(
    tmp_path, tiny_tokenizer, caplog
) -> None:
    dm = _text_module(tmp_path, tiny_tokenizer, overlong="drop")
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        dm.setup("fit")
    assert "data.overlong=drop, data.seq_length=16: 3 of 7 records (2 train, 1 val)" in caplog.text
    # the responses of lines 3 and 5 of the kept records are cut at their end: counted too
    assert "2 of 4 records are longer than data.seq_length=16 (longest 24 tokens)" in caplog.text
    kept = [(p, r) for p, r in TRAIN if p < S]
    assert len(dm.train_dataset) == len(kept) and len(dm.val_dataset) == 1
    for example, (p, r) in zip(dm.train_dataset, kept, strict=True):
        ids = example["input_ids"]
        assert tiny_tokenizer.decode(ids[:p]) == PROMPT_CHARS[:p]  # cut at the end as before
        assert int(example["loss_mask"].sum()) == len(ids) - p == min(r + 1, S - p)


def test_text_overlong_truncate_left_keeps_the_prompt_end_and_the_response(
    tmp_path, tiny_tokenizer, caplog
) -> None:
    dm = _text_module(tmp_path, tiny_tokenizer, overlong="truncate_left")
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        dm.setup("fit")
    assert (
        "data.overlong=truncate_left: 5 of 7 records are longer than data.seq_length=16 "
        "(longest 32 tokens) and lose the start of their prompt (3 with no response token left "
        "otherwise); 1 with a response of seq_length tokens or more also lose its end"
    ) in caplog.text
    eos = tiny_tokenizer.eos_token_id
    for dataset, lengths in ((dm.train_dataset, TRAIN), (dm.val_dataset, VAL)):
        for example, (p, r) in zip(dataset, lengths, strict=True):
            record = _record(p, r)
            prompt = tiny_tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            response = [*tiny_tokenizer(record["response"], add_special_tokens=False)["input_ids"],
                        eos]  # fmt: skip
            expected = _reference(prompt, response, S) if p + r + 1 > S else prompt + response
            assert example["input_ids"].tolist() == expected
            n_response = min(len(response), S - 1)
            assert (
                example["loss_mask"].tolist()
                == [0] * (len(expected) - n_response) + [1] * n_response
            )
    # line 2: 20 prompt tokens and 3 response tokens -> the prompt's last 13 + the response
    assert tiny_tokenizer.decode(dm.train_dataset[1]["input_ids"]) == PROMPT_CHARS[7:20] + "01</s>"
    # line 5: a response of 21 tokens -> the prompt's last token + the response's first 15
    assert tiny_tokenizer.decode(dm.train_dataset[4]["input_ids"]) == "c" + RESPONSE_CHARS[:15]


def test_fit_row_reference_and_positions() -> None:
    prompt, response = list(range(100, 120)), list(range(3))
    assert fit_row(prompt, response, 8, "truncate_left") == (list(range(115, 120)), [0, 1, 2])
    long_response = list(range(30))
    assert fit_row(prompt, long_response, 8, "truncate_left") == ([119], list(range(7)))
    assert fit_row(prompt, response, 8, "error") == (prompt, response)  # cut later, at its end
    assert fit_row([1, 2], [3], 8, "truncate_left") == ([1, 2], [3])


def test_text_response_cut_is_a_warning_not_an_error(tmp_path, tiny_tokenizer, caplog) -> None:
    f = _jsonl(tmp_path / "a.jsonl", [{"prompt": "abcd", "response": "x" * 20}] * 2)
    dm = TextDataModule(train_files=[str(f)], val_files=[str(f)], seq_length=S,
                        chat_template=False)  # fmt: skip
    dm.tokenizer = tiny_tokenizer
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        dm.setup("fit")
    assert "4 of 4 records are longer than data.seq_length=16 (longest 25 tokens)" in caplog.text
    assert "set data.seq_length to 25 to keep them whole" in caplog.text
    assert dm.train_dataset[0]["loss_mask"].tolist() == [0] * 4 + [1] * 12


def test_prompt_response_dataset_checks_overlong_records(tmp_path, tiny_tokenizer) -> None:
    records = [{"prompt": "q" * 40, "response": "a"}, {"prompt": "q", "response": "a"}]
    message = r"2 of 4 records \(1 train, 1 val\) have a prompt .*records\.jsonl:1\)"
    with pytest.raises(ValueError, match=message):
        prepared_examples(tmp_path, tiny_tokenizer, records, seq_length=S, chat_template=False)
    kept = prepared_examples(tmp_path, tiny_tokenizer, records, seq_length=S,
                             chat_template=False, overlong="drop")  # fmt: skip
    assert len(kept) == 1


def test_packed_text_is_never_overlong(tmp_path, tiny_tokenizer) -> None:
    f = tmp_path / "a.txt"
    f.write_text("x" * 200 + "\n\n" + "y" * 50)
    dm = TextDataModule(train_files=[str(f)], val_files=[str(f)], seq_length=S)
    dm.tokenizer = tiny_tokenizer
    dm.setup("fit")
    assert len(dm.train_dataset) == 252 // S


# ---------------------------------------------------------------- DistillDataModule: overlong


def _problem_files(tmp_path: Path) -> tuple[Path, Path]:
    train = [
        {"id": "short", "prompt": "What is 1+1?", "answer": 2, "response": "2"},
        {"id": "long", "prompt": PROMPT_CHARS[:20], "answer": 3, "response": "3 and more"},
        {"id": "cut", "prompt": PROMPT_CHARS[:10], "answer": 4, "response": RESPONSE_CHARS[:10]},
    ]
    val = [
        {"id": "vlong", "prompt": PROMPT_CHARS[:25], "answer": 5, "response": "5"},
        {"id": "vshort", "prompt": "What?", "answer": 6, "response": "6"},
    ]
    return _jsonl(tmp_path / "train.jsonl", train), _jsonl(tmp_path / "val.jsonl", val)


def _distill(tmp_path, teacher_dir, **kwargs) -> DistillDataModule:
    train, val = _problem_files(tmp_path)
    args = dict(train_files=[str(train)], val_files=[str(val)], teacher_responses="dataset",
                seq_length=S, overlong="error")  # fmt: skip
    args.update(kwargs)
    return tiny_paced_datamodule(teacher_dir, tmp_path / "cache", **args)


def test_distill_overlong_with_dataset_responses_fails_at_setup(tmp_path, tiny_teacher_dir):
    dm = _distill(tmp_path, tiny_teacher_dir)
    with pytest.raises(ValueError) as info:
        dm.setup()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "data.seq_length=16: 2 of 5 problems (1 train, 1 val) have a prompt of 16+ tokens "
        "(longest 25, e.g. problem id 'long')"
    )
    # 'vlong' needs 26 for one response token; 'long' is 20 + 10 + EOS = 31 tokens whole
    assert ">= 26 (31 keeps every response whole)" in message


def test_distill_overlong_generated_responses_fail_before_the_teacher_runs(
    tmp_path, tiny_teacher_dir
) -> None:
    """Built-in problems, responses still to generate: setup (which runs before the teacher
    writes any response) already refuses the prompts that leave no room for one."""
    dm = tiny_paced_datamodule(tiny_teacher_dir, tmp_path / "cache", overlong="error")
    tokenizer = dm.tokenizer = make_tokenizer()
    lengths = [len(prompt_token_ids(tokenizer, p.prompt, False)) for p in builtin_problems(24, 0)]
    over = sum(n >= 48 for n in lengths)
    assert over > 0
    with pytest.raises(ValueError, match=rf"data.seq_length=48: {over} of 24 problems \(") as info:
        dm.setup()
    assert f">= {max(lengths) + 1}," in str(info.value)  # no response known: no whole fit
    assert "keeps every response whole" not in str(info.value)


def test_distill_overlong_drop_leaves_the_problems_out(tmp_path, tiny_teacher_dir, caplog):
    dm = _distill(tmp_path, tiny_teacher_dir, overlong="drop")
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        dm.setup()
    assert "data.overlong=drop, data.seq_length=16: 2 of 5 problems (1 train, 1 val)" in caplog.text
    assert [p.id for p in dm.train_problems] == ["short", "cut"]
    assert [p.id for p in dm.val_problems] == ["vshort"]
    assert len(dm.prompts("train")) == 2 and dm.missing_responses("train") == []
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        dm.build_examples()
    assert "1 of 3 problems are longer than data.seq_length=16" in caplog.text  # 'cut'
    assert len(dm.examples("train")) == 2 and len(dm.examples("val")) == 1


def test_distill_overlong_drop_of_generated_responses_keeps_splits_aligned(
    tmp_path, tiny_teacher_dir
) -> None:
    dm = tiny_paced_datamodule(tiny_teacher_dir, tmp_path / "cache", overlong="drop",
                               teacher_prompt_template="Hint {answer}. {prompt}")  # fmt: skip
    dm.setup()
    for split in ("train", "val"):
        n = len(dm.problems(split))
        assert len(dm.prompts(split)) == len(dm.teacher_prompts(split)) == n
        assert len(dm.missing_responses(split)) == n
        assert all(len(p) < 48 for p in dm.prompts(split))
        assert [dm.prompt_ids(p) for p in dm.problems(split)] == dm.prompts(split)
    assert len(dm.train_problems) + len(dm.val_problems) < 24


def test_distill_truncate_left_with_a_teacher_prompt(tmp_path, tiny_teacher_dir, caplog):
    template = "Answer {answer}. {prompt}"
    dm = _distill(tmp_path, tiny_teacher_dir, overlong="truncate_left",
                  teacher_prompt_template=template)  # fmt: skip
    dm.setup()
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        dm.build_examples()
    assert (
        "data.overlong=truncate_left: 3 of 5 problems are longer than data.seq_length=16"
    ) in caplog.text
    tok = dm.tokenizer
    for split in ("train", "val"):
        for example, problem in zip(dm.examples(split), dm.problems(split), strict=True):
            prompt = prompt_token_ids(tok, problem.prompt, False)
            response = [*tok(problem.response, add_special_tokens=False)["input_ids"],
                        tok.eos_token_id]  # fmt: skip
            if len(prompt) + len(response) > S:
                expected = _reference(prompt, response, S)
            else:
                expected = prompt + response
            assert example["input_ids"].tolist() == expected
            # the teacher's whole prompt, then exactly the response tokens the student keeps
            student_targets = example["input_ids"][example["loss_mask"].bool()].tolist()
            assert student_targets == response[: S - 1]
            teacher_text = template.replace("{prompt}", problem.prompt)
            teacher_prompt = prompt_token_ids(tok, teacher_text.replace("{answer}", problem.answer),
                                              False)  # fmt: skip
            assert example["teacher_input_ids"].tolist() == teacher_prompt + student_targets
            assert example["teacher_loss_mask"].sum() == len(student_targets)


def test_distill_teacher_prompt_longer_than_seq_length_is_not_overlong(
    tmp_path, tiny_teacher_dir
) -> None:
    """The teacher's view is its whole prompt before the student's response tokens: it is
    not cut to seq_length, so only the student's prompt can leave no target."""
    dm = _distill(tmp_path, tiny_teacher_dir, overlong="drop",
                  teacher_prompt_template="worked examples " * 4 + "{prompt}")  # fmt: skip
    dm.setup()
    dm.build_examples()
    example = dm.examples("train")[0]
    assert len(example["input_ids"]) <= S < len(example["teacher_input_ids"])
    assert example["teacher_loss_mask"].sum() == example["loss_mask"].sum() > 0


# ------------------------------------------------------------------------------- UTF-8 files


def test_non_utf8_files_are_named_with_line_and_offset(tmp_path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"hello\n\nwor\xffld\n")
    with pytest.raises(ValueError, match=r"a\.txt:3: not UTF-8 text \(byte 0xff at offset 10\); "
                       r"re-encode the file as UTF-8"):  # fmt: skip
        list(read_records(txt))
    records = tmp_path / "b.jsonl"
    records.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 28\)"):
        list(read_records(records))
    problems = tmp_path / "p.jsonl"
    problems.write_bytes(b'{"prompt": "1+1?", "answer": 2}\n\n{"prompt": "\x81", "answer": 1}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:3: not UTF-8 text \(byte 0x81 at offset 45\)"):
        read_problems(problems)


def test_a_non_utf8_data_file_fails_setup_with_its_name(tmp_path, tiny_tokenizer) -> None:
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps({"prompt": "é", "response": "r"}).encode().replace(b"\\u00e9", b"\xe9")
                  + b"\n")  # fmt: skip
    dm = TextDataModule(train_files=[str(f)], val_files=[str(f)])
    dm.tokenizer = tiny_tokenizer
    with pytest.raises(ValueError, match=r"latin1\.jsonl:1: not UTF-8 text \(byte 0xe9"):
        dm.setup("fit")


def test_utf8_with_a_byte_order_mark_is_read(tmp_path) -> None:
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "response": "r"}).encode() + b"\n")
    assert list(read_records(f)) == [{"prompt": "p", "response": "r"}]
    txt = tmp_path / "bom.txt"
    txt.write_bytes(b"\xef\xbb\xbfdoc\r\nline 2\r\n\r\nnext")  # Windows newlines too
    assert list(read_records(txt)) == [{"text": "doc\nline 2"}, {"text": "next"}]


def test_parquet_errors_name_the_file_and_the_fields(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"d\.parquet: not a readable parquet file \("):
        list(read_records(f))
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), f)
    with pytest.raises(ValueError, match=r"d\.parquet:1: record has neither 'text' nor "
                       r"'prompt'\+'response'; its keys are \['answer', 'question'\]"):  # fmt: skip
        list(read_records(f))
    pq.write_table(pa.table({"text": [b"\xff"]}), f)  # bytes, not a string column
    with pytest.raises(ValueError, match=r"d\.parquet:1: 'text' must be a string"):
        list(read_records(f))
    pq.write_table(pa.table({"text": ["one", "two"]}), f)
    assert list(read_records(f)) == [{"text": "one"}, {"text": "two"}]


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "data.batch_size must be at least 1, got 0"),
        ({"seq_length": 1}, "data.seq_length must be at least 2, got 1"),
        ({"num_workers": -1}, "data.num_workers must be at least 0, got -1"),
        ({"val_fraction": 1.0}, "data.val_fraction must be in [0, 1), got 1.0"),
        ({"builtin_documents": 0}, "data.builtin_documents must be at least 1, got 0"),
        (
            {"overlong": "cut"},
            "data.overlong='cut'; choose one of error, drop, truncate_left, keep.",
        ),
    ],
)
def test_text_datamodule_arguments_name_the_field(kwargs, message) -> None:
    with pytest.raises(ValueError) as info:
        TextDataModule(**kwargs)
    assert str(info.value) == message


def test_text_val_fraction_that_holds_out_everything(tmp_path, tiny_tokenizer) -> None:
    f = _jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "response": "r"}])
    dm = TextDataModule(train_files=[str(f)])
    dm.tokenizer = tiny_tokenizer
    with pytest.raises(ValueError, match=r"data.val_fraction=0.05 holds out all 1 records"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # the eight of the issue
        ({"pacing": Pacing(weighting="soft")},
         "data.pacing.weighting='soft'; choose one of paced, uniform, hard_filter."),
        ({"verifier": "nope"}, "data.verifier: unknown verifier 'nope'"),
        ({"pacing": Pacing(alpha=-1.0)}, "data.pacing.alpha must be at least 0, got -1.0"),
        ({"pacing": Pacing(beta=-0.5)}, "data.pacing.beta must be at least 0, got -0.5"),
        ({"rollouts": Rollouts(num_samples=0)}, "data.rollouts.num_samples must be at least 1"),
        ({"seq_length": 0}, "data.seq_length must be at least 2, got 0"),
        ({"pacing": Pacing(bucket_edges=[0.5, 0.2])},
         "data.pacing.bucket_edges must be strictly increasing, got [0.5, 0.2]"),
        ({"val_fraction": 1.5}, "data.val_fraction must be in [0, 1), got 1.5"),
        ({"teacher_prompt_template": "Q: {question}"},
         "data.teacher_prompt_template='Q: {question}' must contain {prompt}"),
        # and the others
        ({"batch_size": 0}, "data.batch_size must be at least 1, got 0"),
        ({"num_workers": -2}, "data.num_workers must be at least 0, got -2"),
        ({"samples_per_epoch": 0}, "data.samples_per_epoch must be at least 1, got 0"),
        ({"num_problems": 0}, "data.num_problems must be at least 1, got 0"),
        ({"problem_kinds": ["add", "div"]}, "data.problem_kinds=['add', 'div']; choose some of"),
        ({"difficulties": [0]}, "data.difficulties=[0]; choose some of 1, 2, 3, 4, 5."),
        ({"overlong": "cut"}, "data.overlong='cut'; choose one of"),
        ({"teacher_responses": TeacherResponses(max_new_tokens=0)},
         "data.teacher_responses.max_new_tokens must be at least 1, got 0"),
        ({"teacher_responses": TeacherResponses(temperature=-1.0)},
         "data.teacher_responses.temperature must be >= 0"),
        ({"validation": Validation(max_problems=0)},
         "data.validation.max_problems must be at least 1, got 0"),
        ({"validation": Validation(num_samples=-1)},
         "data.validation.num_samples must be at least 0, got -1"),
        ({"pacing": Pacing(estimate_every_n_steps=-5)},
         "data.pacing.estimate_every_n_steps must be at least 0, got -5"),
    ],
)  # fmt: skip
def test_distill_datamodule_arguments_name_the_field_in_one_line(kwargs, message) -> None:
    with pytest.raises(ValueError) as info:
        DistillDataModule(**kwargs)  # no tokenizer, no data: checked at construction
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text
