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
            "ce_weight": 0.5,
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
        "train/kd_forward_kl",
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
    assert printed["model"]["divergence"] == "forward_kl"
    assert printed["model"]["student"]["init_args"]["hidden_size"] == 32
    assert printed["data"]["init_args"]["seq_length"] == 32
    assert printed["trainer"]["max_steps"] == 6


def test_help_documents_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    expected_strings = ["--model.divergence", "reverse_kl", "--model.temperature", "--data"]
    expected_strings += [
        "--model.ce_weight",
        "--model.teacher",
        "built-in name",
        "--trainer.max_steps",
    ]
    for expected in expected_strings:
        assert expected in out, expected


def test_bad_divergence_fails_with_field_name(tmp_path, tiny_teacher_dir) -> None:
    with pytest.raises((ValueError, SystemExit)) as err:
        main(["fit", "--config", _config(tmp_path, tiny_teacher_dir, divergence="kl")])
    assert err.type is ValueError and "model.divergence" in str(err.value)
