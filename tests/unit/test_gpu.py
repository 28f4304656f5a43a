"""CUDA paths: bf16 teacher, fp32 math in the loss, the module's step on the GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from lrkd.losses import kd_divergence
from lrkd.module import DistillationModule
from lrkd.objective import Loss

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


def _fit_on_cuda(tmp_path, teacher_dir, strategy: dict, student: dict, **model) -> None:
    """`lrkd fit` on one GPU in bf16 mixed precision, in its own process, with a checkpoint."""
    import subprocess
    import sys

    import yaml

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "max_steps": 3,
            "strategy": strategy, "limit_val_batches": 0, "logger": False,
            "enable_progress_bar": False, "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}],
        },
        "model": {"teacher": str(teacher_dir), "teacher_dtype": "bfloat16", "student": student,
                  "activation_checkpointing": True, **model},
        "data": {"class_path": "lrkd.data.text.TextDataModule",
                 "init_args": {"seq_length": 32, "batch_size": 2, "builtin_documents": 100}},
    }  # fmt: skip
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "lrkd.cli", "fit", "--config", str(path)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_fsdp2_bf16_low_rank_clone_fits_and_exports_on_cuda(tmp_path, tiny_teacher_dir) -> None:
    from lrkd.cli import main

    lrc = {"class_path": "lrkd.models.lowrank.LowRankCloneBuilder",
           "init_args": {"hidden_size": 32}}  # fmt: skip
    _fit_on_cuda(tmp_path, tiny_teacher_dir, {"class_path": "lrkd.distributed.FSDP2Strategy"},
                 lrc, loss={"clone_weight": 0.2})  # fmt: skip
    assert (tmp_path / "ckpt" / "last.ckpt").is_dir()  # sharded
    out = main(["export", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--out",
                str(tmp_path / "exported")])  # fmt: skip
    assert (out / "config.json").is_file()


def test_fsdp1_bf16_plain_student_fits_on_cuda(tmp_path, tiny_teacher_dir) -> None:
    plain = {"class_path": "lrkd.models.students.FromTeacherConfig",
             "init_args": {"hidden_size": 32, "num_hidden_layers": 1}}  # fmt: skip
    _fit_on_cuda(tmp_path, tiny_teacher_dir,
                 {"class_path": "lrkd.distributed.LayerWiseFSDPStrategy"}, plain)  # fmt: skip


def test_fused_head_step_on_cuda_in_bf16_matches_the_logits_step() -> None:
    """On CUDA ``fused_head`` is on by default; under bf16 autocast its loss and gradients
    follow the logits path within bf16 rounding."""
    from lrkd.models.lowrank import LowRankCloneBuilder

    results = []
    for fused in (False, None):  # None: the default, which is the fused path on CUDA
        module = DistillationModule(
            teacher=make_tiny_llama(seed=0),
            teacher_dtype="bfloat16",
            student=LowRankCloneBuilder(hidden_size=32, init_std=0.1),
            fused_head=fused,
            loss=Loss(ce_weight=0.5, clone_weight=0.2),
        ).cuda()
        module.train()
        assert module.uses_fused_head() is (fused is None)
        torch.manual_seed(0)
        ids = torch.randint(4, 100, (2, 24)).cuda()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "loss_mask": torch.ones_like(ids)}  # fmt: skip
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = module.distillation_loss(batch)
        terms["loss"].backward()
        module.on_before_optimizer_step(None)
        grads = {n: p.grad.float().cpu() for n, p in module.student.named_parameters()
                 if p.grad is not None}  # fmt: skip
        results.append((terms["loss"].detach().float().cpu(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-2, atol=1e-3)
    for name, grad in grads_a.items():  # bf16 rounding: compare whole tensors (CPU: <= 1%)
        error = (grads_b[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 3e-2, (name, float(error))
