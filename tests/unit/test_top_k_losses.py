"""lrkd.losses.top_k_kd_divergence (a cached teacher's top-k tokens plus a tail bucket) against
float64 references: equal to the dense divergence, value and gradient, when k covers the
vocabulary; equal to the plainly written bucketed divergence for smaller k, and never above the
dense one."""

from __future__ import annotations

import pytest
import torch
from test_losses import ref_divergence, ref_reduce, single_thread, upstream_weights
from torch import Tensor

from lrkd.losses import DIVERGENCE_KINDS, KDDivergence, kd_divergence, top_k_kd_divergence

SHAPE = (3, 6, 40)
__all__ = ["single_thread"]  # test_losses' autouse fixture: tiny tensors run on one thread


def make_inputs(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(SHAPE, generator=gen, dtype=dtype)
    teacher = 3.0 * torch.randn(SHAPE, generator=gen, dtype=dtype)
    mask = torch.rand(SHAPE[:-1], generator=gen) > 0.3
    mask[0] = True
    return student, teacher, mask


def cache_of(teacher: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """What a teacher cache stores: top-k ids and log-probs, and the log of the rest's mass
    (plain float64: log(1 - sum of the top-k probabilities))."""
    log_p = torch.log_softmax(teacher.double() / temperature, dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    rest = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
    tail = torch.where(rest > 0, rest.log(), torch.full_like(rest, -float("inf")))
    if k == teacher.shape[-1]:
        tail = torch.full_like(tail, -float("inf"))
    return ids, values.to(teacher.dtype), tail.to(teacher.dtype)


def ref_bucketed(student: Tensor, ids: Tensor, teacher_logprobs: Tensor, tail: Tensor, kind: str,
                 temperature: float) -> Tensor:  # fmt: skip
    """The divergence between the k + 1-bucket distributions, written out on probabilities."""
    q = torch.softmax(student.double() / temperature, dim=-1)
    q_top = q.gather(-1, ids)
    q_b = torch.cat([q_top, (1.0 - q_top.sum(-1, keepdim=True)).clamp_min(1e-300)], -1)
    p_b = torch.cat([teacher_logprobs.double().exp(), tail.double().exp().unsqueeze(-1)], -1)
    p_b = p_b / p_b.sum(-1, keepdim=True)
    # ref_divergence takes logits: log-probabilities are logits of the same distribution.
    return ref_divergence(q_b.log(), p_b.log(), kind)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_full_vocabulary_equals_the_dense_loss_and_gradient(kind: str, temperature: float) -> None:
    student, teacher, mask = make_inputs()
    ids, values, tail = cache_of(teacher, SHAPE[-1], temperature)
    assert torch.isinf(tail).all()

    dense_in = student.clone().requires_grad_(True)
    dense = kd_divergence(dense_in, teacher, kind, temperature, mask, chunk_size=5)
    weights = upstream_weights(dense)
    (dense * weights).sum().backward()

    sparse_in = student.clone().requires_grad_(True)
    sparse = top_k_kd_divergence(sparse_in, ids, values, tail, kind, temperature, mask,
                                 chunk_size=5)  # fmt: skip
    (sparse * weights).sum().backward()

    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse_in.grad, dense_in.grad, rtol=1e-10, atol=1e-12)
    reference = ref_reduce(ref_divergence(student, teacher, kind, temperature), mask, "none")
    torch.testing.assert_close(sparse, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 4, 17])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_top_k_is_the_bucketed_divergence_and_a_lower_bound(kind: str, k: int) -> None:
    student, teacher, mask = make_inputs(seed=k)
    ids, values, tail = cache_of(teacher, k, 1.0)
    sparse = top_k_kd_divergence(student, ids, values, tail, kind, 1.0, mask)
    reference = ref_reduce(ref_bucketed(student, ids, values, tail, kind, 1.0), mask, "none")
    torch.testing.assert_close(sparse, reference, rtol=1e-9, atol=1e-12)
    dense = kd_divergence(student, teacher, kind, 1.0, mask)
    assert (sparse <= dense + 1e-12).all()
    assert (sparse[mask] > 0).all()


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_gradient_matches_the_bucketed_reference(kind: str) -> None:
    student, teacher, mask = make_inputs(seed=3)
    ids, values, tail = cache_of(teacher, 5, 1.5)
    ours = student.clone().requires_grad_(True)
    out = top_k_kd_divergence(ours, ids, values, tail, kind, 1.5, mask, chunk_size=4)
    (out * upstream_weights(out)).sum().backward()
    theirs = student.clone().requires_grad_(True)
    ref = ref_reduce(ref_bucketed(theirs, ids, values, tail, kind, 1.5), mask, "none")
    (ref * upstream_weights(ref)).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-8, atol=1e-12)


def test_tail_bucket_is_what_the_student_puts_outside_the_top_k() -> None:
    """A student that matches the teacher on the top-k and on the tail's total mass, but spreads
    the tail differently, has zero top-k forward KL (the loss ignores the tail's shape)."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(1, 1, 10, generator=gen, dtype=torch.float64)
    ids, values, tail = cache_of(teacher, 3, 1.0)
    p = teacher.softmax(-1)
    rest = torch.ones(10, dtype=torch.bool)
    rest[ids[0, 0]] = False
    q = p.clone()
    q[0, 0, rest] = p[0, 0, rest].sum() / rest.sum()  # same tail mass, flat within it
    loss = top_k_kd_divergence(q.log(), ids, values, tail, "forward_kl")
    assert loss.abs().max() < 1e-12
    assert kd_divergence(q.log(), teacher, "forward_kl").item() > 1e-3


def test_float16_storage_is_renormalised() -> None:
    """Log-probs rounded to fp16 (the default storage) give a loss within fp16 rounding of the
    float64 one, never negative."""
    student, teacher, mask = make_inputs(seed=5)
    ids, values, tail = cache_of(teacher, 8, 1.0)
    exact = top_k_kd_divergence(student, ids, values, tail, "forward_kl", mask=mask)
    rounded = top_k_kd_divergence(student.float(), ids.int(), values.half(), tail.half(),
                                  "forward_kl", mask=mask)  # fmt: skip
    assert rounded.dtype == torch.float32
    torch.testing.assert_close(rounded.double(), exact, rtol=5e-3, atol=5e-3)
    assert (rounded >= 0).all()


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_float32_full_vocabulary_has_finite_gradients(kind: str) -> None:
    student, teacher, mask = make_inputs(seed=2, dtype=torch.float32)
    ids, values, tail = cache_of(teacher, SHAPE[-1], 1.0)
    student.requires_grad_(True)
    out = top_k_kd_divergence(student, ids, values.float(), tail.float(), kind, mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(student.grad).all()
    dense = kd_divergence(student.detach(), teacher, kind, mask=mask)
    torch.testing.assert_close(out.detach(), dense, rtol=1e-4, atol=1e-5)


def test_garbage_at_masked_positions_does_not_leak() -> None:
    student, teacher, mask = make_inputs(seed=4)
    ids, values, tail = cache_of(teacher, 6, 1.0)
    values, tail = values.clone(), tail.clone()
    values[~mask] = float("nan")
    tail[~mask] = float("inf")
    student = student.clone().requires_grad_(True)
    out = top_k_kd_divergence(student, ids, values, tail, "reverse_kl", mask=mask,
                              reduction="mean")  # fmt: skip
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(student.grad).all()
    assert (student.grad[~mask] == 0).all()


def test_module_method_and_reductions() -> None:
    student, teacher, mask = make_inputs(seed=6)
    ids, values, tail = cache_of(teacher, 7, 2.0)
    module = KDDivergence("jsd", 2.0, beta=0.3)
    per_token = module.top_k(student, ids, values, tail, mask)
    direct = top_k_kd_divergence(student, ids, values, tail, "jsd", 2.0, mask, beta=0.3)
    torch.testing.assert_close(per_token, direct)
    for reduction in ("sum", "mean", "per_example"):
        torch.testing.assert_close(
            module.top_k(student, ids, values, tail, mask, reduction=reduction),
            ref_reduce(per_token, mask, reduction),
        )


def test_shape_errors() -> None:
    student, teacher, _ = make_inputs()
    ids, values, tail = cache_of(teacher, 4, 1.0)
    with pytest.raises(ValueError, match="leading shape"):
        top_k_kd_divergence(student, ids[:, :-1], values[:, :-1], tail, "forward_kl")
    with pytest.raises(ValueError, match="tail"):
        top_k_kd_divergence(student, ids, values, tail[:, :-1], "forward_kl")
    with pytest.raises(ValueError, match="integers"):
        top_k_kd_divergence(student, ids.double(), values, tail, "forward_kl")
