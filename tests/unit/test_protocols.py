"""The student protocols: what LowRankClone and plain transformers models declare, and a
custom student (examples/factorized_head.py) that implements only Materializable, trained,
sampled and exported through lrkd."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from lightning.pytorch import Trainer
from transformers import AutoModelForCausalLM

from lrkd.callbacks.export import export_student
from lrkd.callbacks.pacing import PassRatePacing
from lrkd.generation.on_policy import OnPolicy
from lrkd.generation.sampling import generation_model
from lrkd.models.lowrank import LowRankClone
from lrkd.models.protocols import (
    ActivationCheckpointing,
    CoRunStudent,
    GradFlushing,
    Materializable,
    SelfSharding,
)
from lrkd.module import DistillationModule

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROTOCOLS = (CoRunStudent, Materializable, SelfSharding, GradFlushing, ActivationCheckpointing)


@pytest.fixture()
def factorized_head(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import factorized_head

    yield factorized_head
    sys.modules.pop("factorized_head", None)


def test_what_each_student_declares() -> None:
    teacher = make_tiny_llama()
    clone = LowRankClone(teacher, 32)
    assert all(isinstance(clone, p) for p in PROTOCOLS)
    assert clone.paired_blocks() == list(clone.blocks)
    plain = make_tiny_llama(seed=1, hidden_size=32, num_attention_heads=2)
    assert [p for p in PROTOCOLS if isinstance(plain, p)] == [ActivationCheckpointing]
    assert not any(isinstance(torch.nn.Linear(2, 2), p) for p in PROTOCOLS)


def test_custom_materializable_student_trains_samples_and_exports(
    factorized_head, tiny_teacher_dir, tmp_path
) -> None:
    from conftest import tiny_paced_datamodule

    student = factorized_head.FactorizedHeadStudent(str(tiny_teacher_dir), hidden_size=32)
    assert [p for p in PROTOCOLS if isinstance(student, p)] == [Materializable]
    module = DistillationModule(
        str(tiny_teacher_dir),
        student,
        teacher_dtype="float32",
        on_policy=OnPolicy(fraction=1.0, max_new_tokens=4),
    )
    datamodule = tiny_paced_datamodule(tiny_teacher_dir, tmp_path / "cache", weighting="uniform")
    Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, limit_val_batches=0, callbacks=[PassRatePacing()],
            default_root_dir=tmp_path).fit(module, datamodule=datamodule)  # fmt: skip
    # Sampling (pass rates, on-policy steps) ran on the materialised plain model.
    plain = generation_model(student)
    assert type(plain).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[5, 17, 40, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, student(ids))
    out = export_student(student, tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids))
