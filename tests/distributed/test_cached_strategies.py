"""`lrkd fit` from a teacher cache on 2 CPU processes: DDP and FSDP2 follow the 1-process loss
trajectory on the same global batches, a DDP run resumed from a mid-run checkpoint continues with
the uninterrupted run's losses, and `lrkd export` writes the student of an FSDP2 sharded
checkpoint of a cached run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tokenizer
from loss_recorder import fit_in_subprocess, read_losses
from transformers import AutoModelForCausalLM

from lrkd.cli import main
from lrkd.data.cache_teacher import cache_teacher
from lrkd.data.manifest import PrepareSettings
from lrkd.data.prepare import prepare

SEQ = 24
STRATEGIES = {
    "single": ({"devices": 1}, 4),
    "ddp": ({"devices": 2, "strategy": "ddp"}, 2),
    "fsdp2": ({"devices": 2, "strategy": {"class_path": "lrkd.distributed.FSDP2Strategy",
                                           "init_args": {"save_distributed_checkpoint": True}}},
              2),
}  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_teacher_dir) -> Path:
    root = tmp_path_factory.mktemp("cache")
    settings = PrepareSettings(seq_length=SEQ, builtin_documents=120, val_fraction=0.1)
    prepared = prepare(None, root / "prepared", make_tokenizer(), settings,
                       tokenizer_name=str(tiny_teacher_dir))  # fmt: skip
    return cache_teacher(prepared, root / "k8", str(tiny_teacher_dir), top_k=8,
                         teacher_dtype="float32")  # fmt: skip


def _config(tmp: Path, cache: Path, name: str, strategy: str) -> Path:
    trainer, batch_size = STRATEGIES[strategy]
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 4, "accelerator": "cpu", "precision": "32-true", **trainer,
            "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / f"{name}_ckpt"), "every_n_train_steps": 2,
                               "save_top_k": -1, "filename": "{step}"}},
                {"class_path": "loss_recorder.RecordLosses",
                 "init_args": {"path": str(tmp / f"{name}_losses.jsonl")}},
            ],
        },
        "model": {
            "teacher_cache": str(cache),
            "student": {"class_path": "lrkd.models.students.FromTeacherConfig",
                        "init_args": {"hidden_size": 32, "num_hidden_layers": 1, "seed": 0}},
            "loss": {"ce_weight": 0.5},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
        },
        "data": {"class_path": "lrkd.data.text.TextDataModule",
                 "init_args": {"seq_length": SEQ, "batch_size": batch_size}},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.distributed
def test_ddp_and_fsdp2_from_a_cache_match_one_process_and_resume(tmp_path, cache) -> None:
    runs = {}
    for strategy in STRATEGIES:
        fit_in_subprocess(_config(tmp_path, cache, strategy, strategy))
        runs[strategy] = read_losses(tmp_path / f"{strategy}_losses.jsonl")
    single = runs["single"]
    assert sorted(single) == [0, 1, 2, 3] and len(set(single.values())) == 4
    for strategy in ("ddp", "fsdp2"):
        for step, loss in single.items():
            # Same global batch: the ranks' mean per-token loss is the one-process loss.
            torch.testing.assert_close(runs[strategy][step], loss, rtol=1e-5, atol=0)

    fit_in_subprocess(_config(tmp_path, cache, "resumed", "ddp"), "--ckpt_path",
         str(tmp_path / "ddp_ckpt" / "step=2.ckpt"))  # fmt: skip
    resumed = read_losses(tmp_path / "resumed_losses.jsonl")
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        torch.testing.assert_close(resumed[step], runs["ddp"][step], rtol=1e-6, atol=0)

    sharded = tmp_path / "fsdp2_ckpt" / "step=4.ckpt"
    assert sharded.is_dir()
    out = main(["export", "--ckpt_path", str(sharded), "--out", str(tmp_path / "exported")])
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.hidden_size == 32
    ids = torch.tensor([[1, 40, 41, 42]])
    assert torch.isfinite(exported(input_ids=ids).logits).all()
