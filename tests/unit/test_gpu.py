"""CUDA paths: bf16 teacher, fp32 math in the loss, the module's step on the GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from lrkd.losses import kd_divergence
from lrkd.module import DistillationModule

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_bf16_logits_on_cuda_match_float64(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 16, 1000, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 16, 1000, generator=g, dtype=torch.float64) * 2
    expected = kd_divergence(student, teacher, kind, 2.0, reduction="mean")
    actual = kd_divergence(
        student.cuda().bfloat16(), teacher.cuda().bfloat16(), kind, 2.0, reduction="mean"
    )
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.cpu().double(), expected, rtol=2e-2, atol=1e-3)


def test_module_step_on_cuda_with_bf16_teacher() -> None:
    module = DistillationModule(
        teacher=make_tiny_llama(seed=0),
        student=make_tiny_llama(seed=1, hidden_size=32, num_attention_heads=2),
        teacher_dtype="bfloat16",
    ).cuda()
    ids = torch.randint(4, 100, (2, 12), device="cuda")
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "loss_mask": torch.ones_like(ids),
    }
    terms = module.distillation_loss(batch)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    assert next(module.teacher.parameters()).dtype == torch.bfloat16
    assert all(p.grad is not None for p in module.student.parameters())
