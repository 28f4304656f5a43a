"""Startup checks (lrkd.preflight) and the one-line errors of lrkd.errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy

from lrkd.errors import MAX_LINE, setting_error, short_message
from lrkd.preflight import check_hardware, check_trainer, check_writable, resume_differences


def test_short_message_keeps_the_key_and_the_most_specific_reason() -> None:
    typed = "Parser key \"model.loss.kd_weight\":\n  Expected a <class 'float'>. Got value: abc"
    assert (
        short_message(typed) == "model.loss.kd_weight: Expected a <class 'float'>. Got value: abc"
    )
    union = (
        'Parser key "data":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [<class 'LightningDataModule'>, <class 'NoneType'>]\n  Errors:\n"
        "    - Problem with given class_path 'lrkd.data.datamodule.DistillDataModule':\n"
        '      - Key "pacing.alpah" is not expected\n'
        "    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'jsonargparse._namespace.Namespace'>\n"
        "  Given value: Namespace(" + "x=1, " * 500 + ")"
    )
    assert short_message(union) == 'data: Key "pacing.alpah" is not expected'
    assert len(short_message("x" * 5000)) == MAX_LINE


def test_setting_error_finds_lrkds_own_error_under_a_wrapper() -> None:
    from lrkd.data.datamodule import DistillDataModule
    from lrkd.data.paced_settings import Pacing

    try:
        try:
            DistillDataModule(pacing=Pacing(weighting="bogus"))
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        found = setting_error(outer)
    assert found is not None and "data.pacing.weighting='bogus'" in str(found)
    assert setting_error(ValueError("raised outside lrkd")) is None


def test_check_writable(tmp_path) -> None:
    check_writable(tmp_path / "new" / "deeper", "dirpath")  # can be made: fine, nothing made
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"dirpath='.*file/sub'.*is a file"):
        check_writable(tmp_path / "file" / "sub", "dirpath")
    # /proc refuses new files even to root (os.access would say yes to root).
    with pytest.raises(PermissionError, match=r"trainer.default_root_dir='/proc/lrkd/x' cannot"):
        check_writable(__import__("pathlib").Path("/proc/lrkd/x"), "trainer.default_root_dir")


def test_check_trainer_refuses_no_training_and_unwritable_outputs(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"trainer\.max_steps=0: nothing would be trained"):
        check_trainer(Trainer(max_steps=0, logger=False, default_root_dir=tmp_path))
    checkpoint = ModelCheckpoint(dirpath="/proc/lrkd/ckpt")
    trainer = Trainer(max_steps=1, logger=False, default_root_dir=tmp_path, callbacks=[checkpoint])
    with pytest.raises(PermissionError, match=r"\(ModelCheckpoint\)\.dirpath='/proc/lrkd/ckpt'"):
        check_trainer(trainer)
    check_trainer(Trainer(max_steps=1, logger=False, default_root_dir=tmp_path))


def test_check_hardware_names_the_fix_for_fsdp1_and_gpu_on_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"trainer.accelerator=gpu.*FSDP1 needs CUDA.*fsdp2\.yaml"):
        check_hardware("gpu", FSDPStrategy())
    with pytest.raises(ValueError, match=r"trainer.strategy=FSDPStrategy \(FSDP1\) needs CUDA"):
        check_hardware("cpu", FSDPStrategy())
    check_hardware("auto", "ddp")


def test_resume_differences_split_refused_and_changeable_settings() -> None:
    saved = {
        "teacher": "t",
        "student": {"class_path": "S", "init_args": {"hidden_size": 32}},
        "loss": {"divergence": "forward_kl", "ce_weight": 0.5},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
        "_instantiator": "lightning",
    }
    given = {
        "teacher": "t",
        "student": {"class_path": "S", "init_args": {"hidden_size": 64}},
        "loss": {"divergence": "reverse_kl", "ce_weight": 0.5},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}},
    }
    refused, changed = resume_differences(given, saved)
    assert refused == [
        "model.optimizer.init_args.lr: 0.003 in the checkpoint, 0.001 in the config",
        "model.student.init_args.hidden_size: 32 in the checkpoint, 64 in the config",
    ]
    assert changed == [
        "model.loss.divergence: 'forward_kl' in the checkpoint, 'reverse_kl' in the config"
    ]
