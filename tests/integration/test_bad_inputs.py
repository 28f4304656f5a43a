"""Bad inputs, as a new user would try them: every one ends the command with a non-zero exit
status and a short last line that names the field or the file, before anything half-written
is left behind (issue 26's table; the closing note lists command -> last line).

Each case runs ``lrkd`` in this process (:func:`run`) and reads what the console would show
last: the ``error: ...`` line of a refused setting, or the final line of the traceback of an
exception. ``test_console_shows_the_same_last_line`` checks that against real processes.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lrkd.cli import console_main
from lrkd.data.corpus import builtin_corpus

#: The longest last line a bad input may end with.
SHORT = 300


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``lrkd ARGV`` in this process, as the console script runs it: (exit status, the last
    line it shows on the console)."""
    capsys.readouterr()
    code, last = 0, ""
    saved = sys.argv
    sys.argv = ["lrkd", *argv]
    try:
        console_main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            last = exit_.code
    except BaseException as err:  # what Python prints last for an uncaught exception
        code, last = 1, "".join(traceback.format_exception_only(err)).strip()
    finally:
        sys.argv = saved
    err_lines = capsys.readouterr().err.strip().splitlines()
    if not last and err_lines:
        last = err_lines[-1]
    return code, last.strip().splitlines()[-1] if last.strip() else ""


def base_config(tmp: Path, teacher: Path) -> dict[str, Any]:
    """A tiny, valid `lrkd fit` config whose outputs all live under ``tmp``."""
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 2,
            "accelerator": "cpu",
            "limit_val_batches": 1,
            "val_check_interval": 2,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp / "runs"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp / "runs"), "name": "bad"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True},
                },
                {
                    "class_path": "lrkd.callbacks.export.ExportStudent",
                    "init_args": {"dirpath": str(tmp / "student")},
                },
            ],
        },
        "model": {
            "teacher": str(teacher),
            "teacher_dtype": "float32",
            "student": {
                "class_path": "lrkd.models.students.FromTeacherConfig",
                "init_args": {"hidden_size": 32, "num_hidden_layers": 1, "seed": 0},
            },
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
        },
        "data": {
            "class_path": "lrkd.data.text.TextDataModule",
            "init_args": {
                "seq_length": 32,
                "batch_size": 4,
                "builtin_documents": 100,
                "cache_dir": str(tmp / "data_cache"),
            },
        },
    }


def paced(config: dict[str, Any], tmp: Path, **init_args: Any) -> dict[str, Any]:
    """``config`` with a small DistillDataModule (built-in problems) and ``init_args``."""
    config["data"] = {
        "class_path": "lrkd.data.datamodule.DistillDataModule",
        "init_args": {
            "num_problems": 16, "chat_template": False, "batch_size": 4, "seq_length": 48,
            "teacher_responses": {"max_new_tokens": 4, "cache_dir": str(tmp / "cache")},
            "rollouts": {"num_samples": 2, "max_new_tokens": 4},
            **init_args,
        },
    }  # fmt: skip
    return config


def set_in(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """``config`` with the value at ``dotted`` (``trainer.callbacks.0.init_args.dirpath``)."""
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(last) if isinstance(node, list) else last] = value
    return config


@dataclass
class Case:
    """A bad input: how to make it, what the last line must name, what must not be left."""

    name: str
    make: Callable[[Path, Path], list[str]]  # (tmp, teacher) -> the lrkd arguments
    names: str  # the field or file the last line names
    left_alone: tuple[str, ...] = ("ckpt", "student")  # paths under tmp that must not exist
    also: tuple[str, ...] = field(default_factory=tuple)  # more text the last line contains


def fit(change: Callable[[dict[str, Any], Path], Any], *extra: str) -> Callable[..., list[str]]:
    """A case that runs `lrkd fit` with the base config after ``change(config, tmp)``."""

    def make(tmp: Path, teacher: Path) -> list[str]:
        config = base_config(tmp, teacher)
        changed = change(config, tmp)
        config = changed if isinstance(changed, dict) else config
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return ["fit", "--config", str(path), *extra]

    return make


def flag(*argv: str) -> Callable[..., list[str]]:
    """A case that adds command-line flags to the base config."""
    return fit(lambda config, tmp: None, *argv)


def export_case(prepare: Callable[[Path], tuple[str, str]], *extra: str) -> Callable[..., list]:
    """A case that runs `lrkd export` on the checkpoint and --out ``prepare(tmp)`` returns."""

    def make(tmp: Path, teacher: Path) -> list[str]:
        ckpt, out = prepare(tmp)
        return ["export", "--ckpt_path", ckpt, "--out", out, *extra]

    return make


def _truncated(tmp: Path) -> tuple[str, str]:
    path = tmp / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "hyper_parameters": {}}, path)
    path.write_bytes(path.read_bytes()[:3000])
    return str(path), str(tmp / "student")


def _not_a_checkpoint(tmp: Path) -> tuple[str, str]:
    (tmp / "notes.ckpt").write_text("these are my notes, not a checkpoint\n")
    return str(tmp / "notes.ckpt"), str(tmp / "student")


def _non_empty_out(tmp: Path) -> tuple[str, str]:
    out = tmp / "mine"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"someone else's shard")
    torch.save({"state_dict": {}, "hyper_parameters": {"student": None}}, tmp / "x.ckpt")
    return str(tmp / "x.ckpt"), str(out)


def _overlong_prompts(config: dict[str, Any], tmp: Path) -> None:
    records = [{"prompt": "q" * 200, "response": "a"}] * 3 + [{"prompt": "q", "response": "a"}] * 5
    path = tmp / "long.jsonl"
    path.write_text("".join(f"{__import__('json').dumps(r)}\n" for r in records))
    set_in(config, "data.init_args.train_files", [str(path)])
    set_in(config, "data.init_args.chat_template", False)


def _latin1_file(config: dict[str, Any], tmp: Path) -> None:
    path = tmp / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n\nune autre histoire\n".encode("latin-1"))
    set_in(config, "data.init_args.train_files", [str(path)])


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(f"{json.dumps(row)}\n" for row in rows))
    return path


def _text_data(config: dict[str, Any], **init_args: Any) -> None:
    """``config``'s TextDataModule (its cache under tmp, as in base_config) with ``init_args``."""
    for name, value in init_args.items():
        set_in(config, f"data.init_args.{name}", value)


def _bad_jsonl_line(config: dict[str, Any], tmp: Path) -> None:
    path = _jsonl(tmp / "notes.jsonl", [{"text": "a first note"}, {"text": "a second note"}])
    path.write_text(path.read_text() + '{"text": "a third note",}\n')
    _text_data(config, train_files=[str(path)])


def _parquet_with_other_columns(config: dict[str, Any], tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"question": ["2+2?", "3+3?"], "answer": ["4", "6"]})
    pq.write_table(table, tmp / "qa.parquet")
    _text_data(config, train_files=[str(tmp / "qa.parquet")])


def _mixed_kinds(config: dict[str, Any], tmp: Path) -> None:
    text = _jsonl(tmp / "stories.jsonl", [{"text": f"story {i}"} for i in range(4)])
    pairs = _jsonl(tmp / "chats.jsonl", [{"prompt": "hi", "response": "hello"}] * 4)
    _text_data(config, train_files=[str(text), str(pairs)])


def _prepared_with(tmp: Path, tokenizer: Any, name: str) -> Path:
    """The built-in corpus prepared under ``tmp`` with ``tokenizer`` (named ``name``)."""
    from lrkd.data.manifest import PrepareSettings
    from lrkd.data.prepare import prepare

    source = _jsonl(tmp / "corpus.jsonl", [{"text": d} for d in builtin_corpus(100)])
    settings = PrepareSettings(seq_length=32)
    return prepare([str(source)], tmp / "prepared", tokenizer, settings, tokenizer_name=name)


def _prepared_with_another_tokenizer(config: dict[str, Any], tmp: Path) -> None:
    from conftest import make_tokenizer

    other = make_tokenizer()
    other.add_tokens(["the"])
    prepared = _prepared_with(tmp, other, "my-other-tokenizer")
    _text_data(config, prepared=str(prepared))


def _source_changed_after_prepare(config: dict[str, Any], tmp: Path) -> None:
    from conftest import make_tokenizer

    prepared = _prepared_with(tmp, make_tokenizer(), str(config["model"]["teacher"]))
    with (tmp / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"text": "one more document, added after lrkd prepare"}) + "\n")
    _text_data(config, prepared=str(prepared))


def _unfinished_prepared(config: dict[str, Any], tmp: Path) -> None:
    (tmp / "prepared" / "train").mkdir(parents=True)  # as an interrupted copy might leave it
    _text_data(config, prepared=str(tmp / "prepared"))


def _two_stage(config: dict[str, Any], tmp: Path) -> None:
    config["trainer"]["callbacks"].append({
        "class_path": "lrkd.callbacks.two_stage.TwoStageKL",
        "init_args": {"switch_step": 100},
    })  # fmt: skip
    config["trainer"]["max_steps"] = 16


def _fsdp1(config: dict[str, Any], tmp: Path) -> None:
    config["trainer"]["strategy"] = {"class_path": "lrkd.distributed.LayerWiseFSDPStrategy"}


def _resume_with_other_shape(tmp: Path, teacher: Path) -> list[str]:
    config = base_config(tmp / "first", teacher)
    path = tmp / "first.yaml"
    path.write_text(yaml.safe_dump(config))
    assert run(["fit", "--config", str(path)], _CAPSYS[0])[0] == 0
    ckpt = tmp / "first" / "ckpt" / "last.ckpt"
    bigger = copy.deepcopy(config)
    set_in(bigger, "model.student.init_args.hidden_size", 64)
    bigger["trainer"]["callbacks"][1]["init_args"]["dirpath"] = str(tmp / "student")
    (tmp / "bigger.yaml").write_text(yaml.safe_dump(bigger))
    return ["fit", "--config", str(tmp / "bigger.yaml"), "--ckpt_path", str(ckpt)]


_CAPSYS: list[Any] = []

CASES: list[Case] = [
    # Accepted silently before (issue 26).
    Case("prompt longer than seq_length", fit(_overlong_prompts), "data.seq_length"),
    Case("export into a non-empty directory", export_case(_non_empty_out), "--out",
         left_alone=("student",), also=("--overwrite",)),
    Case("resume with a student of another shape", _resume_with_other_shape,
         "model.student.init_args.hidden_size", left_alone=("student",)),
    Case("TwoStageKL switch after the last step", fit(_two_stage), "switch_step=100",
         also=("max_steps=16",)),
    Case("negative kd_weight", flag("--model.loss.kd_weight", "-1"), "model.loss.kd_weight"),
    Case("max_steps 0", flag("--trainer.max_steps", "0"), "trainer.max_steps"),
    # DataModule settings that failed poorly (a 74-line traceback).
    Case("unknown weighting", fit(lambda c, t: paced(c, t, pacing={"weighting": "bogus"})),
         "data.pacing.weighting"),
    Case("unknown verifier", fit(lambda c, t: paced(c, t, verifier="no_such_verifier")),
         "verifier"),
    Case("negative alpha", fit(lambda c, t: paced(c, t, pacing={"alpha": -1.0})),
         "data.pacing.alpha"),
    Case("negative beta", fit(lambda c, t: paced(c, t, pacing={"beta": -0.5})),
         "data.pacing.beta"),
    Case("zero rollouts", fit(lambda c, t: paced(c, t, rollouts={"num_samples": 0})),
         "data.rollouts.num_samples"),
    Case("seq_length 0", fit(lambda c, t: paced(c, t, seq_length=0)), "data.seq_length"),
    Case("unsorted bucket edges",
         fit(lambda c, t: paced(c, t, pacing={"bucket_edges": [0.5, 0.25]})), "bucket_edges"),
    Case("val_fraction 1.5", fit(lambda c, t: paced(c, t, val_fraction=1.5)),
         "data.val_fraction"),
    Case("teacher prompt without {prompt}",
         fit(lambda c, t: paced(c, t, teacher_prompt_template="Answer:")),
         "data.teacher_prompt_template"),
    # Errors that ended in torch's or Python's words.
    Case("negative learning rate", flag("--model.optimizer.init_args.lr", "-0.001"),
         "model.optimizer"),
    Case("batch_size 0", flag("--data.init_args.batch_size", "0"), "data.batch_size"),
    Case("a file that is not UTF-8", fit(_latin1_file), "latin1.txt"),
    # Data files and prepared data (lrkd prepare).
    Case("a malformed JSONL line", fit(_bad_jsonl_line), "notes.jsonl:3",
         also=("malformed JSON",)),
    Case("a parquet file with other columns", fit(_parquet_with_other_columns), "qa.parquet:1",
         also=("['answer', 'question']",)),
    Case("text and prompt+response records mixed", fit(_mixed_kinds), "stories.jsonl:1",
         also=("chats.jsonl:1",)),
    Case("data prepared with another tokenizer", fit(_prepared_with_another_tokenizer),
         "my-other-tokenizer", also=("lrkd prepare --like",)),
    Case("a source changed after lrkd prepare", fit(_source_changed_after_prepare),
         "corpus.jsonl", also=("changed size", "lrkd prepare --like")),
    Case("a prepared directory without its manifest", fit(_unfinished_prepared),
         "data.prepared", also=("manifest.json", "lrkd prepare --train_files")),
    Case("truncated checkpoint to export", export_case(_truncated), "--ckpt_path",
         left_alone=("student",)),
    Case("not a checkpoint, to export", export_case(_not_a_checkpoint), "--ckpt_path",
         left_alone=("student",)),
    Case("FSDP1 on CPU", fit(_fsdp1), "FSDP1", also=("fsdp2.yaml",)),
    Case("checkpoint directory cannot be written",
         fit(lambda c, t: set_in(c, "trainer.callbacks.0.init_args.dirpath", "/proc/lrkd/c")),
         "dirpath",
         also=("/proc/lrkd/c",)),
    Case("export directory cannot be written",
         fit(lambda c, t: set_in(c, "trainer.callbacks.1.init_args.dirpath", "/proc/lrkd/s")),
         "dirpath", also=("/proc/lrkd/s",)),
    Case("lrkd export --out cannot be written",
         export_case(lambda tmp: (_truncated(tmp)[0], "/proc/lrkd/out")), "--out"),
    Case("truncated checkpoint to resume", lambda tmp, teacher: flag(
        "--ckpt_path", _truncated(tmp)[0])(tmp, teacher), "--ckpt_path"),
    # Handled before issue 26; kept here so that they stay handled.
    Case("unknown divergence", flag("--model.loss.divergence", "kl"), "model.loss.divergence"),
    Case("a value of the wrong type", flag("--model.loss.kd_weight", "abc"),
         "model.loss.kd_weight"),
    Case("an unknown flag", flag("--model.loss.kd_wieght", "1"), "--model.loss.kd_wieght"),
    Case("a missing config file", lambda tmp, teacher: ["fit", "--config", str(tmp / "no.yaml")],
         "no.yaml"),
    Case("a teacher directory that does not exist",
         fit(lambda c, t: set_in(c, "model.teacher", str(t / "no_teacher"))), "model.teacher"),
    Case("clone_weight for a plain student", flag("--model.loss.clone_weight", "0.5"),
         "model.loss.clone_weight"),
    Case("a flag of the earlier flat layout", flag("--model.ce_weight", "0.5"),
         "model.ce_weight", also=("model.loss.ce_weight",)),
    Case("temperature 0", flag("--model.loss.temperature", "0"), "model.loss"),
    Case("on-policy fraction above 1", flag("--model.on_policy.fraction", "1.5"),
         "model.on_policy.fraction"),
    Case("an unknown teacher dtype", flag("--model.teacher_dtype", "float8"),
         "teacher_dtype"),
    Case("export of a checkpoint not written by lrkd fit",
         export_case(lambda tmp: (torch.save({"state_dict": {}}, tmp / "plain.ckpt"),
                                  str(tmp / "plain.ckpt"), str(tmp / "student"))[1:]),
         "export_student", left_alone=("student",)),
    Case("rank advisor without a token budget",
         lambda tmp, teacher: ["rank", "--teacher", str(teacher)], "num_tokens"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_fails_with_a_short_line_naming_the_field(
    case: Case, tmp_path: Path, tiny_teacher_dir: Path, capsys
) -> None:
    _CAPSYS[:] = [capsys]
    argv = case.make(tmp_path, tiny_teacher_dir)
    code, last = run(argv, capsys)
    assert code != 0, f"exit status 0; last line: {last!r}"
    assert case.names in last, last
    for text in case.also:
        assert text in last, last
    assert len(last) <= SHORT, f"{len(last)} characters: {last}"
    for name in case.left_alone:
        assert not (tmp_path / name).exists(), f"{name} was written"
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"


@pytest.mark.parametrize("name", ["unknown weighting", "max_steps 0", "negative learning rate"])
def test_console_shows_the_same_last_line(name: str, tmp_path, tiny_teacher_dir, capsys) -> None:
    """The in-process harness reads what a real `lrkd` process shows last."""
    case = next(c for c in CASES if c.name == name)
    _CAPSYS[:] = [capsys]
    argv = case.make(tmp_path, tiny_teacher_dir)
    proc = subprocess.run([sys.executable, "-m", "lrkd.cli", *argv], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    shown = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0
    assert shown == run(argv, capsys)[1]
