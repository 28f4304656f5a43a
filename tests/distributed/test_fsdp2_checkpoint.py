"""`lrkd fit` under FSDP2 on 2 CPU processes: a sharded checkpoint resumes to the same losses
as the uninterrupted run, a full (single-file) checkpoint does too, and `lrkd export` writes the
student of a sharded checkpoint as a plain Hugging Face model equal to the trained one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from loss_recorder import fit_in_subprocess, read_losses
from transformers import AutoModelForCausalLM

from lrkd.cli import main


def _config(
    tmp: Path, teacher_dir: Path, name: str, sharded: bool, precision: str = "32-true"
) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 4,
            "accelerator": "cpu",
            "precision": precision,
            "devices": 2,
            "strategy": {
                "class_path": "lrkd.distributed.FSDP2Strategy",
                "init_args": {"save_distributed_checkpoint": sharded},
            },
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / f"{name}_ckpt"), "every_n_train_steps": 2,
                               "save_top_k": -1, "filename": "{step}"}},
                {"class_path": "loss_recorder.RecordLosses",
                 "init_args": {"path": str(tmp / f"{name}_losses.jsonl")}},
                {"class_path": "lrkd.callbacks.export.ExportStudent",
                 "init_args": {"dirpath": str(tmp / f"{name}_student")}},
            ],
        },
        "model": {
            "teacher": str(teacher_dir),
            "teacher_dtype": "float32",
            "student": {"class_path": "lrkd.models.lowrank.LowRankCloneBuilder",
                        "init_args": {"hidden_size": 32, "clone_loss": "mse"}},
            "loss": {"clone_weight": 0.5, "ce_weight": 0.5},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
        },
        "data": {
            "class_path": "lrkd.data.text.TextDataModule",
            "init_args": {"seq_length": 32, "batch_size": 2, "builtin_documents": 200},
        },
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.distributed
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "full"])
def test_fsdp2_checkpoint_resumes_and_exports(tmp_path, tiny_teacher_dir, sharded: bool) -> None:
    whole = _config(tmp_path, tiny_teacher_dir, "whole", sharded)
    fit_in_subprocess(whole)
    expected = read_losses(tmp_path / "whole_losses.jsonl")
    assert sorted(expected) == [0, 1, 2, 3] and len(set(expected.values())) == 4
    checkpoint = tmp_path / "whole_ckpt" / "step=2.ckpt"
    assert checkpoint.is_dir() == sharded and checkpoint.exists()
    if sharded:  # one shard file per rank, and no teacher weights in it
        assert len(list(checkpoint.glob("*.distcp"))) == 2
        meta = torch.load(checkpoint / "meta.pt", weights_only=False)
        assert meta["global_step"] == 2
    else:
        state = torch.load(checkpoint, weights_only=False)["state_dict"]
        assert state and not any("teacher" in k for k in state), list(state)[:5]

    resumed = _config(tmp_path, tiny_teacher_dir, "resumed", sharded)
    fit_in_subprocess(resumed, "--ckpt_path", str(checkpoint))
    got = read_losses(tmp_path / "resumed_losses.jsonl")
    assert sorted(got) == [2, 3]
    for step in (2, 3):
        torch.testing.assert_close(got[step], expected[step], rtol=1e-6, atol=0)

    final = tmp_path / "whole_ckpt" / "step=4.ckpt"
    out = main(["export", "--ckpt_path", str(final), "--out", str(tmp_path / "exported")])
    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "whole_student")
    assert exported.config.hidden_size == 32
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.distributed
def test_fsdp2_bf16_mixed_export_is_made_from_the_fp32_masters(tmp_path, tiny_teacher_dir) -> None:
    """Under bf16-mixed FSDP2 gathers parameters in bf16 for the forward; ExportStudent must
    still multiply out the fp32 projections, exactly as `lrkd export` does from the checkpoint
    (it once used the bf16 gather and differed by up to 4e-3)."""
    run = _config(tmp_path, tiny_teacher_dir, "bf16", True, precision="bf16-mixed")
    fit_in_subprocess(run)
    final = tmp_path / "bf16_ckpt" / "step=4.ckpt"
    out = main(["export", "--ckpt_path", str(final), "--out", str(tmp_path / "exported")])
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16_student").state_dict()
    assert trained.keys() == exported.keys()
    for name, value in trained.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)
