"""The lrkd command: fit from a config, --print_config, --help, and config errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrkd.cli import main


def _config(tmp_path, teacher_dir, **model) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 6,
            "accelerator": "cpu",
            "val_check_interval": 3,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
                },
                {
                    "class_path": "lrkd.callbacks.export.ExportStudent",
                    "init_args": {"dirpath": str(tmp_path / "student")},
                },
            ],
        },
        "model": {
            "teacher": str(teacher_dir),
            "student": {
                "class_path": "lrkd.models.students.FromTeacherConfig",
                "init_args": {"hidden_size": 32, "num_hidden_layers": 1, "seed": 0},
            },
            "loss": {"ce_weight": 0.5},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
            **model,
        },
        "data": {
            "class_path": "lrkd.data.text.TextDataModule",
            "init_args": {"seq_length": 32, "batch_size": 4, "builtin_documents": 200},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_fit_writes_logs_checkpoint_and_exported_student(tmp_path, tiny_teacher_dir) -> None:
    main(["fit", "--config", _config(tmp_path, tiny_teacher_dir)])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    events = list((tmp_path / "runs" / "tiny").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/kd",
        "train/ce",
        "val/loss",
        "val/kd_forward_kl",
    } <= tags

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    ids = tokenizer("ab", return_tensors="pt")["input_ids"]
    out = student.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    assert student.config.hidden_size == 32


def test_validate_from_checkpoint(tmp_path, tiny_teacher_dir) -> None:
    config = _config(tmp_path, tiny_teacher_dir)
    main(["fit", "--config", config])
    cli = main(
        ["validate", "--config", config, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")]
    )
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_print_config_prints_everything(tmp_path, tiny_teacher_dir, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", _config(tmp_path, tiny_teacher_dir), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["teacher"] == str(tiny_teacher_dir)
    assert printed["model"]["loss"]["divergence"] == "forward_kl"
    assert printed["model"]["student"]["init_args"]["hidden_size"] == 32
    assert printed["data"]["init_args"]["seq_length"] == 32
    assert printed["trainer"]["max_steps"] == 6


@pytest.mark.parametrize(
    ("cuda_bf16", "cpu_speedup", "bf16"),
    [(False, 0.1, False), (False, 8.0, True), (True, 0.1, True)],
    ids=["avx2-cpu", "amx-cpu", "bf16-gpu"],
)
def test_precision_defaults_to_bf16_mixed_where_bf16_is_fast(
    tmp_path, tiny_teacher_dir, capsys, monkeypatch, cpu_bf16, cuda_bf16, cpu_speedup, bf16
) -> None:
    cpu_bf16(cpu_speedup)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    config = _config(tmp_path, tiny_teacher_dir)
    for extra in ([], ["--trainer.precision", "32-true"], ["--trainer.precision", "bf16-mixed"]):
        with pytest.raises(SystemExit):
            main(["fit", "--config", config, *extra, "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)
        expected = extra[1] if extra else ("bf16-mixed" if bf16 else "32-true")
        assert printed["trainer"]["precision"] == expected


def test_help_documents_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    expected_strings = [
        "--model.loss.divergence",
        "reverse_kl",
        "--model.loss.temperature",
        "--data",
    ]
    expected_strings += [
        "--model.loss.ce_weight",
        "--model.teacher",
        "built-in name",
        "--trainer.max_steps",
    ]
    for expected in expected_strings:
        assert expected in out, expected


def test_top_level_help_lists_every_subcommand(capsys) -> None:
    import subprocess
    import sys

    from lrkd.cli import SUBCOMMANDS

    assert main(["--help"]) is None
    out = capsys.readouterr().out
    names = ("fit", "validate", "test", "predict", "prepare", "cache-teacher", "export", "eval",
             "rank", "env")  # fmt: skip
    for name in names:
        assert f"\n  {name} " in out, name
    assert set(SUBCOMMANDS) == {
        "fit",
        "validate",
        "test",
        "predict",
        "prepare",
        "cache-teacher",
        "export",
        "eval",
        "rank",
        "env",
    }
    # The installed console script, as a user types it; no subcommand is a usage error.
    script = [sys.executable, "-c", "from lrkd.cli import console_main; console_main()"]
    done = subprocess.run(script, capture_output=True, text=True)
    assert done.returncode == 2 and "subcommands:" in done.stderr


def test_version_and_environment_report(capsys) -> None:
    import importlib.metadata

    import lrkd
    from lrkd.env import declared_ranges, packages

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"lrkd {lrkd.__version__}"
    assert lrkd.__version__ == importlib.metadata.version("lrkd")
    main(["env"])
    out = capsys.readouterr().out
    for name in ("torch", "transformers", "lightning", "jsonargparse"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert importlib.metadata.version(name) in line and declared_ranges()[name] in line
    assert "cpu " in out and ("CUDA" in out)
    by_name = {p.name: p for p in packages()}
    assert by_name["transformers"].in_range is True  # the suite runs on a supported set
    from lrkd.env import PackageInfo

    assert PackageInfo("transformers", "4.57.0", ">=5.17,<6").in_range is False
    assert PackageInfo("datasets", None, "").in_range is None


def test_bad_divergence_fails_with_field_name(tmp_path, tiny_teacher_dir, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", _config(tmp_path, tiny_teacher_dir, loss={"divergence": "kl"})])
    assert err.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: model.loss.divergence='kl' is not a known divergence")


def test_lrc_fit_logs_clone_terms_and_export_command(tmp_path, tiny_teacher_dir) -> None:
    lrc = {
        "class_path": "lrkd.models.lowrank.LowRankCloneBuilder",
        "init_args": {"hidden_size": 32, "clone_loss": "relative_mse"},
    }
    config = _config(
        tmp_path, tiny_teacher_dir, student=lrc, loss={"ce_weight": 0.5, "clone_weight": 0.2}
    )
    # An fp32 teacher, so that the fp32 export must give the trained clone's logits to fp32
    # tolerance. (With auto on a bf16-fast CPU the teacher is bf16, the live clone computes parts
    # in it, and the two differed by up to 3e-4: measured on an AVX512-BF16 EPYC.)
    cli = main(["fit", "--config", config, "--trainer.accumulate_grad_batches", "2",
                "--model.teacher_dtype", "float32"])  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((tmp_path / "runs" / "tiny").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/clone", "val/clone"} | {f"train/clone_{t}" for t in ("q", "gate", "ffn_out")}
    assert expected <= tags

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    trained = cli.model.teacher.state_dict()
    for name, value in teacher.state_dict().items():  # in the teacher's dtype (auto: bf16 on AMX)
        assert torch.equal(trained[name], value.to(trained[name].dtype)), name

    out = main(["export", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--out",
                str(tmp_path / "exported")])  # fmt: skip
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.hidden_size == 32
    assert AutoTokenizer.from_pretrained(out) is not None
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        expected_logits = cli.model.student(ids).logits
        logits = exported(input_ids=ids).logits
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)


def test_export_explains_a_checkpoint_without_a_student_config(tmp_path) -> None:
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="export_student"):
        main(["export", "--ckpt_path", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o")])


def test_resume_refuses_a_changed_student_and_takes_changed_loss_settings(
    tmp_path, tiny_teacher_dir, capsys, caplog
) -> None:
    """--ckpt_path with a config that differs from the checkpoint: a student of another shape
    is refused before any work, naming the field; a changed divergence and temperature are
    used (not silently replaced by the checkpoint's) and logged."""
    config = _config(tmp_path, tiny_teacher_dir)
    main(["fit", "--config", config, "--trainer.max_steps", "2"])
    ckpt = str(tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--ckpt_path", ckpt,
              "--model.student.init_args.hidden_size", "64"])  # fmt: skip
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: --ckpt_path {ckpt}: the config differs from the checkpoint")
    assert "model.student.init_args.hidden_size" in last

    with caplog.at_level("WARNING", logger="lrkd"):
        cli = main(["fit", "--config", config, "--ckpt_path", ckpt, "--trainer.max_steps", "3",
                    "--model.loss.divergence", "reverse_kl",
                    "--model.loss.temperature", "2"])  # fmt: skip
    assert cli.model.objective.divergence.kind == "reverse_kl"
    assert cli.model.objective.divergence.temperature == 2.0
    assert cli.trainer.global_step == 3
    changed = [
        r.getMessage() for r in caplog.records if "resuming with a changed" in r.getMessage()
    ]
    assert any("model.loss.divergence: 'forward_kl' in the checkpoint, 'reverse_kl'" in m
               for m in changed), changed  # fmt: skip
    assert any("model.loss.temperature" in m for m in changed), changed


def test_export_refuses_a_non_empty_directory_and_never_deletes_other_files(tmp_path) -> None:
    from conftest import make_tiny_llama, make_tokenizer

    from lrkd.callbacks.export import export_student

    out = tmp_path / "out"
    out.mkdir()
    unrelated = {"model-00001-of-00002.safetensors": b"old shard", "notes.txt": b"mine"}
    for name, content in unrelated.items():
        (out / name).write_bytes(content)
    student = make_tiny_llama(seed=1)
    with pytest.raises(FileExistsError, match=r"--out='.*out' is not empty \(2 entries"):
        export_student(student, out, make_tokenizer())
    assert sorted(p.name for p in out.iterdir()) == sorted(unrelated)

    export_student(student, out, make_tokenizer(), overwrite=True)
    for name, content in unrelated.items():
        assert (out / name).read_bytes() == content  # untouched
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left

    class Broken(torch.nn.Module):
        def save_pretrained(self, path) -> None:
            (path / "model.safetensors").write_bytes(b"half written")
            raise OSError("disk full")

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        export_student(Broken(), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "truncated"])
def test_export_names_an_unreadable_checkpoint(tmp_path, content) -> None:
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"--ckpt_path='.*bad\.ckpt' is not a readable checkpoint"):
        main(["export", "--ckpt_path", str(path), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_second_fit_goes_on_from_the_exported_student(tmp_path, tiny_teacher_dir) -> None:
    """The recipes' hand-over: stage 2's student is stage 1's export (``Pretrained``)."""
    from lrkd.models.students import Pretrained
    from lrkd.models.teachers import load_teacher

    for stage in ("one", "two"):
        (tmp_path / stage).mkdir()
    main(["fit", "--config", _config(tmp_path / "one", tiny_teacher_dir)])
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "student")
    teacher = load_teacher(str(tiny_teacher_dir))
    loaded = Pretrained(str(tmp_path / "one" / "student"))(teacher)
    assert loaded.training and all(p.requires_grad for p in loaded.parameters())
    expected = first.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)

    student = {"class_path": "lrkd.models.students.Pretrained",
               "init_args": {"path": str(tmp_path / "one" / "student")}}  # fmt: skip
    main(["fit", "--config", _config(tmp_path / "two", tiny_teacher_dir, student=student)])
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "student")
    assert second.config.hidden_size == 32
    pairs = zip(second.parameters(), first.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # six more steps trained it


def test_a_pretrained_student_must_cover_the_teachers_vocabulary(tmp_path, tiny_teacher_dir):
    from conftest import make_tiny_llama

    from lrkd.models.students import Pretrained
    from lrkd.models.teachers import load_teacher

    teacher = load_teacher(str(tiny_teacher_dir))
    make_tiny_llama(vocab_size=teacher.config.vocab_size - 1).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match=r"model.student.path=.*fewer than the teacher's"):
        Pretrained(str(tmp_path / "small"))(teacher)
    with pytest.raises(FileNotFoundError, match=r"model\.student\.path"):
        Pretrained(str(tmp_path / "missing"))(teacher)
