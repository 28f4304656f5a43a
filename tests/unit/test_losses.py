"""Tests for lrkd.losses against independent float64 references."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lrkd.losses import (
    DIVERGENCE_KINDS,
    KDDivergence,
    chunked_cross_entropy,
    head_kd_losses,
    kd_divergence,
)

SHAPE = (3, 7, 50)
REDUCTIONS = ("none", "sum", "mean", "per_example")
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # The tensors here are tiny; OpenMP hand-offs dominate and are very slow on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# float64 references: plain formulas on softmax probabilities.
# --------------------------------------------------------------------------------------------


def ref_kl(p: Tensor, q: Tensor) -> Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def ref_divergence(
    student: Tensor,
    teacher: Tensor,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    q = torch.softmax(student.to(dtype) / temperature, dim=-1)
    p = torch.softmax(teacher.to(dtype) / temperature, dim=-1)
    if kind == "forward_kl":
        return ref_kl(p, q)
    if kind == "reverse_kl":
        return ref_kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if kind == "skew_forward_kl":
        return ref_kl(p, skew_alpha * p + (1 - skew_alpha) * q)
    if kind == "skew_reverse_kl":
        return ref_kl(q, skew_alpha * q + (1 - skew_alpha) * p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def ref_reduce(values: Tensor, mask: Tensor, reduction: str) -> Tensor:
    mask = mask.double()
    values = values * mask
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.sum() / mask.sum()
    return values.sum(-1) / mask.sum(-1)


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def make_inputs(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Student and teacher logits with distinct scales, and a mask with one empty position."""
    gen = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(shape, generator=gen)
    teacher = 3.0 * torch.randn(shape, generator=gen)
    mask = torch.rand(shape[:-1], generator=gen) > 0.3
    mask[0] = True  # one complete example
    mask[1, 3] = False  # a position masked out everywhere
    mask[1, 0] = True
    mask[2, 0] = True
    return student, teacher, mask


def upstream_weights(out: Tensor, seed: int = 1) -> Tensor:
    """Random gradient for non-scalar outputs so every element's gradient is checked."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)


def value_and_grads(
    fn, student: Tensor, teacher: Tensor, teacher_grad: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(teacher_grad)
    out = fn(student, teacher)
    (out * upstream_weights(out)).sum().backward()
    return out.detach(), student.grad, teacher.grad


def check_against_reference(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    kind: str,
    reduction: str,
    teacher_grad: bool = False,
    **kwargs,
) -> None:
    temperature = kwargs.pop("temperature", 1.0)
    out, grad_s, grad_t = value_and_grads(
        lambda s, t: kd_divergence(s, t, kind, temperature, mask, reduction=reduction, **kwargs),
        student,
        teacher,
        teacher_grad,
    )
    ref_kwargs = {k: v for k, v in kwargs.items() if k in ("beta", "skew_alpha")}
    ref_out, ref_grad_s, ref_grad_t = value_and_grads(
        lambda s, t: ref_reduce(
            ref_divergence(s, t, kind, temperature, **ref_kwargs), mask, reduction
        ),
        student.double(),
        teacher.double(),
        teacher_grad,
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out.float(), **TOL)
    # Gradients: TOL, or twice the error of the same plain formula evaluated in float32 where
    # that is larger. fp32 rounding of log-probabilities (|log q| up to ~20 at T = 0.7) alone
    # can exceed 1e-6 on some CPUs (measured 2.4e-6 on an AMD EPYC for reverse_kl), and lrkd
    # must match fp32 arithmetic, not beat it.
    _, fp32_grad_s, fp32_grad_t = value_and_grads(
        lambda s, t: ref_reduce(
            ref_divergence(s, t, kind, temperature, dtype=torch.float32, **ref_kwargs),
            mask,
            reduction,
        ),
        student,
        teacher,
        teacher_grad,
    )
    pairs = [(grad_s, ref_grad_s, fp32_grad_s)]
    if teacher_grad:
        pairs.append((grad_t, ref_grad_t, fp32_grad_t))
    for grad, ref_grad, fp32_grad in pairs:
        fp32_error = float((fp32_grad.double() - ref_grad).abs().max())
        atol = max(TOL["atol"], 2 * fp32_error)
        torch.testing.assert_close(grad, ref_grad.float(), rtol=TOL["rtol"], atol=atol)


# --------------------------------------------------------------------------------------------
# Values and gradients against the references.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_matches_float64_reference(kind: str, temperature: float, reduction: str) -> None:
    student, teacher, mask = make_inputs()
    check_against_reference(
        student, teacher, mask, kind, reduction, temperature=temperature, chunk_size=4
    )


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_teacher_gradient_matches_reference(kind: str) -> None:
    student, teacher, mask = make_inputs(seed=3)
    check_against_reference(
        student, teacher, mask, kind, "mean", teacher_grad=True, temperature=1.5, chunk_size=5
    )


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_jsd_beta(beta: float, reduction: str) -> None:
    student, teacher, mask = make_inputs(seed=4)
    check_against_reference(
        student, teacher, mask, "jsd", reduction, teacher_grad=True, temperature=2.0, beta=beta
    )


@pytest.mark.parametrize("kind", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew_alpha", [0.1, 0.5, 0.9])
def test_skew_alpha(kind: str, skew_alpha: float) -> None:
    student, teacher, mask = make_inputs(seed=5)
    check_against_reference(
        student, teacher, mask, kind, "per_example", teacher_grad=True, skew_alpha=skew_alpha
    )


def test_jsd_endpoints_are_the_kls() -> None:
    student, teacher, mask = make_inputs(seed=6)
    forward = kd_divergence(student, teacher, "forward_kl", 1.3, mask)
    reverse = kd_divergence(student, teacher, "reverse_kl", 1.3, mask)
    torch.testing.assert_close(kd_divergence(student, teacher, "jsd", 1.3, mask, beta=0.0), forward)
    torch.testing.assert_close(kd_divergence(student, teacher, "jsd", 1.3, mask, beta=1.0), reverse)


def unit_scale_inputs(dtype: torch.dtype, seed: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    # Unit-scale logits: with heavy-tailed p/q the O(beta) remainder of the limit is large.
    student, teacher, mask = make_inputs(seed=seed)
    return (student / 2).to(dtype), (teacher / 3).to(dtype), mask


def test_jsd_normalised_limits() -> None:
    student, teacher, mask = unit_scale_inputs(torch.float64)
    forward = kd_divergence(student, teacher, "forward_kl", mask=mask)
    reverse = kd_divergence(student, teacher, "reverse_kl", mask=mask)
    beta = 1e-4
    near_zero = kd_divergence(student, teacher, "jsd", mask=mask, beta=beta) / beta
    near_one = kd_divergence(student, teacher, "jsd", mask=mask, beta=1 - beta) / beta
    torch.testing.assert_close(near_zero, forward, rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(near_one, reverse, rtol=1e-3, atol=1e-9)


def test_jsd_normalised_limit_float32() -> None:
    # In float32 the tiny KL(q || M) term suffers cancellation, so use a larger beta.
    student, teacher, mask = unit_scale_inputs(torch.float32)
    beta = 1e-3
    near_zero = kd_divergence(student, teacher, "jsd", mask=mask, beta=beta, reduction="sum")
    forward = kd_divergence(student, teacher, "forward_kl", mask=mask, reduction="sum")
    torch.testing.assert_close(near_zero / beta, forward, rtol=1e-2, atol=0.0)


@pytest.mark.parametrize(
    ("skew", "plain"), [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")]
)
def test_skew_alpha_zero_is_plain_kl(skew: str, plain: str) -> None:
    student, teacher, mask = make_inputs(seed=8)
    torch.testing.assert_close(
        kd_divergence(student, teacher, skew, 2.0, mask, skew_alpha=0.0),
        kd_divergence(student, teacher, plain, 2.0, mask),
    )


# --------------------------------------------------------------------------------------------
# Chunking, dtypes and layouts.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_chunk_size_does_not_change_results(kind: str) -> None:
    student, teacher, mask = make_inputs(seed=9)
    results = [
        value_and_grads(
            lambda s, t, c=chunk: kd_divergence(
                s, t, kind, 1.7, mask, chunk_size=c, reduction="none"
            ),
            student,
            teacher,
            teacher_grad=True,
        )
        for chunk in (1, 5, None, 1000)
    ]
    for out, grad_s, grad_t in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        torch.testing.assert_close(grad_s, results[0][1])
        torch.testing.assert_close(grad_t, results[0][2])


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd"])
def test_bf16_inputs(kind: str) -> None:
    student, teacher, mask = make_inputs(seed=10)
    student16, teacher16 = student.bfloat16(), teacher.bfloat16()
    out16, grad16, _ = value_and_grads(
        lambda s, t: kd_divergence(s, t, kind, 2.0, mask, chunk_size=4), student16, teacher16
    )
    assert out16.dtype == torch.float32
    assert grad16.dtype == torch.bfloat16
    assert torch.isfinite(out16).all() and torch.isfinite(grad16).all()

    # The math is float32: identical to float32 inputs holding the same (rounded) values.
    out32, grad32, _ = value_and_grads(
        lambda s, t: kd_divergence(s, t, kind, 2.0, mask, chunk_size=4),
        student16.float(),
        teacher16.float(),
    )
    torch.testing.assert_close(out16, out32, **TOL)
    torch.testing.assert_close(grad16, grad32.bfloat16())

    # And close to the unrounded float32 inputs, within bf16 rounding of the logits.
    out_exact, _, _ = value_and_grads(
        lambda s, t: kd_divergence(s, t, kind, 2.0, mask), student, teacher
    )
    torch.testing.assert_close(out16, out_exact, rtol=3e-2, atol=3e-3)


def test_mixed_dtypes() -> None:
    student, teacher, mask = make_inputs(seed=11)
    out = kd_divergence(student, teacher.bfloat16(), "forward_kl", mask=mask)
    ref = kd_divergence(student, teacher.bfloat16().float(), "forward_kl", mask=mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_float64_inputs_stay_float64() -> None:
    student, teacher, mask = (x.double() for x in make_inputs(seed=12))
    out = kd_divergence(student, teacher, "reverse_kl", 1.0, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(
        out, ref_reduce(ref_divergence(student, teacher, "reverse_kl"), mask, "none")
    )


@pytest.mark.parametrize("kind", ["forward_kl", "skew_reverse_kl"])
def test_gradients_match_finite_differences_float64(kind: str) -> None:
    """Vector-Jacobian products of both inputs against central differences along random
    directions, a fresh graph each time (the gradients are taken in the forward pass and
    consumed by one backward)."""
    student, teacher, mask = (x.double() for x in make_inputs((3, 4, 6), seed=13))

    def f(s: Tensor, t: Tensor) -> Tensor:
        return kd_divergence(s, t, kind, 1.5, mask, chunk_size=2)

    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for _ in range(3):
        v = torch.randn(3, 4, generator=g, dtype=torch.float64)  # the upstream gradient
        s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
        (f(s, t) * v).sum().backward()
        for which, grad in ((0, s.grad), (1, t.grad)):
            u = torch.randn(student.shape, generator=g, dtype=torch.float64)
            moved = [[student, teacher], [student, teacher]]
            moved[0][which] = moved[0][which] + eps * u
            moved[1][which] = moved[1][which] - eps * u
            numeric = ((f(*moved[0]) - f(*moved[1])) * v).sum() / (2 * eps)
            torch.testing.assert_close((grad * u).sum(), numeric, rtol=1e-6, atol=1e-9)


def test_a_retained_graph_is_refused_not_wrong() -> None:
    student, teacher, mask = make_inputs(seed=13)
    student.requires_grad_(True)
    out = kd_divergence(student, teacher, "forward_kl", 1.0, mask, reduction="sum")
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_non_contiguous_slice_of_wider_vocab() -> None:
    student, teacher, mask = make_inputs(seed=14)
    wide_student = torch.randn(*SHAPE[:-1], 64)
    wide_student[..., : SHAPE[-1]] = student
    wide_student.requires_grad_(True)
    wide_teacher = torch.randn(*SHAPE[:-1], 64)
    wide_teacher[..., : SHAPE[-1]] = teacher
    sliced_student = wide_student[..., : SHAPE[-1]]
    assert not sliced_student.is_contiguous()

    out = kd_divergence(
        sliced_student, wide_teacher[..., : SHAPE[-1]], "jsd", 1.5, mask, chunk_size=4
    )
    (out * upstream_weights(out)).sum().backward()
    ref_out, ref_grad, _ = value_and_grads(
        lambda s, t: kd_divergence(s, t, "jsd", 1.5, mask, chunk_size=4), student, teacher
    )
    torch.testing.assert_close(out.detach(), ref_out)
    torch.testing.assert_close(wide_student.grad[..., : SHAPE[-1]], ref_grad)
    assert (wide_student.grad[..., SHAPE[-1] :] == 0).all()


def shifted(x: Tensor) -> Tensor:
    """``x`` as ``logits[:, :-1]`` of a longer sequence: its leading dims cannot be merged."""
    longer = torch.cat([x, torch.randn(x.shape[0], 1, x.shape[-1], dtype=x.dtype)], dim=1)
    view = longer[:, :-1]
    with pytest.raises(RuntimeError):
        view.view(-1, x.shape[-1])
    return view


@pytest.mark.parametrize("chunk_size", [1, 4, 7, None])
@pytest.mark.parametrize("which", ["student", "both"])
def test_shifted_logits_layout(which: str, chunk_size: int | None) -> None:
    """The usual ``logits[:, :-1]`` call works, including chunks that straddle sequences."""
    student, teacher, mask = make_inputs(seed=27)

    def loss(s: Tensor, t: Tensor) -> Tensor:
        return kd_divergence(s, t, "reverse_kl", 1.5, mask, chunk_size=chunk_size)

    ref_out, ref_grad_s, ref_grad_t = value_and_grads(loss, student, teacher, teacher_grad=True)
    base_student = shifted(student).detach().requires_grad_(True)
    base_teacher = (shifted(teacher) if which == "both" else teacher).detach().requires_grad_(True)
    out = loss(base_student, base_teacher)
    (out * upstream_weights(out)).sum().backward()
    torch.testing.assert_close(out.detach(), ref_out)
    torch.testing.assert_close(base_student.grad, ref_grad_s)
    torch.testing.assert_close(base_teacher.grad, ref_grad_t)

    targets = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        chunked_cross_entropy(shifted(student), targets, mask, chunk_size=chunk_size),
        chunked_cross_entropy(student, targets, mask, chunk_size=chunk_size),
    )


@pytest.mark.parametrize("layout", ["contiguous", "vocab_slice", "shifted"])
def test_saves_one_gradient_per_differentiable_input_for_backward(layout: str) -> None:
    """Between forward and backward only the student's [N, V] gradient is kept (taken in the
    forward pass): neither logits tensor, and no copy or other [N, V] intermediate."""
    student, teacher, mask = make_inputs(seed=26)
    if layout == "vocab_slice":
        student = torch.cat([student, torch.zeros(*SHAPE[:-1], 4)], dim=-1)[..., : SHAPE[-1]]
    elif layout == "shifted":
        student, teacher = shifted(student), shifted(teacher)
    student.requires_grad_(True)
    saved: list[weakref.ref[Tensor]] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = kd_divergence(student, teacher, "jsd", 2.0, mask, chunk_size=4, reduction="mean")
    # What is still saved once forward has returned (each chunk's own graph is gone by then).
    alive = [t for t in (ref() for ref in saved) if t is not None]
    large = [t for t in alive if t.numel() >= SHAPE[0] * SHAPE[1] * 2]
    assert len(large) == 1  # the student's unit gradient; the teacher needs none
    (unit,) = large
    assert unit.shape == student.shape and unit.numel() == math.prod(SHAPE)
    assert unit.data_ptr() not in {student.data_ptr(), teacher.data_ptr()}
    del alive, large, unit
    out.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_transposed_input() -> None:
    student, teacher, _ = make_inputs(seed=15)
    out = kd_divergence(student.transpose(0, 1), teacher.transpose(0, 1), "tvd")
    torch.testing.assert_close(out, kd_divergence(student, teacher, "tvd").transpose(0, 1))


# --------------------------------------------------------------------------------------------
# Closed forms and edge cases.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_identical_logits_give_zero(kind: str) -> None:
    student, _, _ = make_inputs(seed=16)
    student.requires_grad_(True)
    out = kd_divergence(student, student.detach(), kind, 1.3, reduction="sum")
    out.backward()
    torch.testing.assert_close(out, torch.tensor(0.0), atol=1e-5, rtol=0)
    if kind != "tvd":  # |x| has a kink at 0
        torch.testing.assert_close(student.grad, torch.zeros_like(student), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_values_are_non_negative(kind: str) -> None:
    student, teacher, mask = make_inputs(seed=17)
    assert (kd_divergence(student, teacher, kind, 0.5, mask) >= 0).all()


def test_tvd_of_disjoint_distributions_is_one() -> None:
    student = torch.full((2, 10), -30.0)
    teacher = torch.full((2, 10), -30.0)
    student[:, 0] = 30.0
    teacher[:, 1] = 30.0
    torch.testing.assert_close(kd_divergence(student, teacher, "tvd"), torch.ones(2))


def test_forward_kl_closed_form() -> None:
    # Two classes: KL([a, 1 - a] || [b, 1 - b]).
    a, b = 0.8, 0.3
    teacher = torch.tensor([[0.0, torch.logit(torch.tensor(1 - a)).item()]])
    student = torch.tensor([[0.0, torch.logit(torch.tensor(1 - b)).item()]])
    expected = a * torch.log(torch.tensor(a / b)) + (1 - a) * torch.log(
        torch.tensor((1 - a) / (1 - b))
    )
    torch.testing.assert_close(kd_divergence(student, teacher, "forward_kl"), expected.reshape(1))


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_minus_inf_logits_give_zero_probability(kind: str) -> None:
    """Vocabulary entries masked with -inf in both models act as if they were not there."""
    student, teacher, mask = make_inputs(seed=18)
    padded_student = F.pad(student, (0, 6), value=float("-inf"))
    padded_teacher = F.pad(teacher, (0, 6), value=float("-inf"))

    def loss(s: Tensor, t: Tensor) -> Tensor:
        return kd_divergence(s, t, kind, 1.2, mask, chunk_size=4)

    out, grad_s, grad_t = value_and_grads(loss, padded_student, padded_teacher, teacher_grad=True)
    ref_out, ref_grad_s, ref_grad_t = value_and_grads(loss, student, teacher, teacher_grad=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad_s[..., :-6], ref_grad_s)
    torch.testing.assert_close(grad_t[..., :-6], ref_grad_t)
    assert (grad_s[..., -6:] == 0).all()
    assert (grad_t[..., -6:] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, None])
def test_garbage_in_masked_positions_does_not_leak(chunk_size: int | None) -> None:
    student, teacher, mask = make_inputs(seed=19)
    student[1, 3] = float("nan")
    teacher[1, 3] = float("inf")
    student.requires_grad_(True)
    out = kd_divergence(student, teacher, "jsd", 1.0, mask, chunk_size=chunk_size, reduction="mean")
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(student.grad).all()
    assert (student.grad[1, 3] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "per_example", "sum"])
def test_empty_mask_gives_zero(reduction: str) -> None:
    student, teacher, _ = make_inputs(seed=20)
    student.requires_grad_(True)
    mask = torch.zeros(SHAPE[:-1], dtype=torch.bool)
    out = kd_divergence(student, teacher, "forward_kl", mask=mask, reduction=reduction)
    out.sum().backward()
    assert (out == 0).all()
    assert (student.grad == 0).all()


def test_per_example_with_one_empty_example() -> None:
    student, teacher, mask = make_inputs(seed=21)
    mask[2] = False
    out = kd_divergence(student, teacher, "reverse_kl", mask=mask, reduction="per_example")
    assert out.shape == (SHAPE[0],)
    assert out[2] == 0
    ref = ref_reduce(ref_divergence(student, teacher, "reverse_kl"), mask, "per_example")
    torch.testing.assert_close(out[:2], ref[:2].float(), **TOL)


def test_broadcast_and_integer_masks() -> None:
    student, teacher, _ = make_inputs(seed=22)
    position_mask = torch.tensor([1, 1, 0, 1, 0, 1, 1])  # [L], broadcast over the batch
    out = kd_divergence(student, teacher, "tvd", mask=position_mask, reduction="mean")
    ref = ref_reduce(
        ref_divergence(student, teacher, "tvd"), position_mask.expand(SHAPE[:-1]), "mean"
    )
    torch.testing.assert_close(out, ref.float(), **TOL)


def test_module_matches_function() -> None:
    student, teacher, mask = make_inputs(seed=23)
    module = KDDivergence("skew_forward_kl", 2.0, skew_alpha=0.3, chunk_size=3)
    torch.testing.assert_close(
        module(student, teacher, mask, reduction="mean"),
        kd_divergence(
            student, teacher, "skew_forward_kl", 2.0, mask, skew_alpha=0.3, reduction="mean"
        ),
    )
    assert "skew_forward_kl" in repr(module)


# --------------------------------------------------------------------------------------------
# Cross-entropy.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_cross_entropy_matches_torch(reduction: str, chunk_size: int | None) -> None:
    logits, _, mask = make_inputs(seed=24)
    targets = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=torch.Generator().manual_seed(0))
    targets[~mask] = -100

    def ours(s: Tensor, _: Tensor) -> Tensor:
        return chunked_cross_entropy(s, targets, mask, chunk_size=chunk_size, reduction=reduction)

    def reference(s: Tensor, _: Tensor) -> Tensor:
        per_token = F.cross_entropy(s.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        return ref_reduce(per_token, mask, reduction)

    out, grad, _ = value_and_grads(ours, logits, logits)
    ref_out, ref_grad, _ = value_and_grads(reference, logits.double(), logits.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out.float(), **TOL)
    torch.testing.assert_close(grad, ref_grad.float(), **TOL)
    if reduction == "mean":
        torch.testing.assert_close(
            out, F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100), **TOL
        )


def test_cross_entropy_bf16() -> None:
    logits, _, mask = make_inputs(seed=25)
    targets = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=torch.Generator().manual_seed(1))
    logits16 = logits.bfloat16().requires_grad_(True)
    out = chunked_cross_entropy(logits16, targets, mask, reduction="sum")
    out.backward()
    assert out.dtype == torch.float32
    assert logits16.grad.dtype == torch.bfloat16
    ref = chunked_cross_entropy(logits16.detach().float(), targets, mask, reduction="sum")
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------


def test_unknown_kind_lists_valid_kinds() -> None:
    student, teacher, _ = make_inputs()
    with pytest.raises(ValueError, match="forward_kl") as info:
        kd_divergence(student, teacher, "kl")
    assert all(kind in str(info.value) for kind in DIVERGENCE_KINDS)
    with pytest.raises(ValueError, match="tvd"):
        KDDivergence("nope")  # type: ignore[arg-type]


def test_shape_mismatch() -> None:
    student, teacher, _ = make_inputs()
    with pytest.raises(ValueError, match=r"\(3, 7, 50\).*\(3, 7, 49\)"):
        kd_divergence(student, teacher[..., :49])


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature: float) -> None:
    student, teacher, _ = make_inputs()
    with pytest.raises(ValueError, match="temperature"):
        kd_divergence(student, teacher, temperature=temperature)


@pytest.mark.parametrize("beta", [-0.1, 1.1])
def test_bad_beta(beta: float) -> None:
    student, teacher, _ = make_inputs()
    with pytest.raises(ValueError, match="beta"):
        kd_divergence(student, teacher, "jsd", beta=beta)


@pytest.mark.parametrize("skew_alpha", [-0.1, 1.0])
def test_bad_skew_alpha(skew_alpha: float) -> None:
    student, teacher, _ = make_inputs()
    with pytest.raises(ValueError, match="skew_alpha"):
        kd_divergence(student, teacher, "skew_forward_kl", skew_alpha=skew_alpha)


def test_bad_reduction_chunk_size_and_mask() -> None:
    student, teacher, _ = make_inputs()
    with pytest.raises(ValueError, match="reduction"):
        kd_divergence(student, teacher, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        kd_divergence(student, teacher, chunk_size=0)
    with pytest.raises(ValueError, match="broadcast"):
        kd_divergence(student, teacher, mask=torch.ones(4, dtype=torch.bool))


def test_cross_entropy_errors() -> None:
    logits, _, _ = make_inputs()
    with pytest.raises(ValueError, match="Targets"):
        chunked_cross_entropy(logits, torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        chunked_cross_entropy(logits, torch.zeros(3, 7))


# ---------------------------------------------------------------------------- head_kd_losses


def _head_inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, length, d_s, d_t, vocab = 2, 7, 6, 10, 37
    h_s = torch.randn(b, length, d_s, generator=g, dtype=dtype, requires_grad=True)
    w_s = (torch.randn(vocab, d_s, generator=g, dtype=dtype) * 0.7).requires_grad_(True)
    h_t = torch.randn(b, length, d_t, generator=g, dtype=dtype)
    w_t = torch.randn(vocab, d_t, generator=g, dtype=dtype) * 0.7
    targets = torch.randint(0, vocab, (b, length), generator=g)
    mask = torch.rand(b, length, generator=g) > 0.3
    mask[0, 0] = True
    return h_s, w_s, h_t, w_t, targets, mask


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_kd_losses_equal_the_logits_path(kind: str, dtype: torch.dtype) -> None:
    """The fused path (logits a few tokens at a time, from hidden states and heads) gives the
    plain path's per-token divergence and CE, and the same gradients for the student's hidden
    states and head; masked-out tokens are zero and get no gradient."""
    h_s, w_s, h_t, w_t, targets, mask = _head_inputs(dtype)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    div, ce = head_kd_losses(h_s, w_s, h_t, w_t, targets, mask, kind, 2.0, beta=0.3,
                             skew_alpha=0.2, chunk_size=3)  # fmt: skip
    (div * weights).sum().add((ce * weights.flip(0)).sum()).backward()
    fused = (div.detach(), ce.detach(), h_s.grad.clone(), w_s.grad.clone())
    h_s.grad = w_s.grad = None

    s_logits, t_logits = h_s @ w_s.t(), h_t @ w_t.t()
    ref_div = kd_divergence(s_logits, t_logits, kind, 2.0, mask, beta=0.3, skew_alpha=0.2)
    ref_ce = chunked_cross_entropy(s_logits, targets, mask)
    (ref_div * weights).sum().add((ref_ce * weights.flip(0)).sum()).backward()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(fused[0], ref_div.to(fused[0].dtype), **tol)
    torch.testing.assert_close(fused[1], ref_ce.to(fused[1].dtype), **tol)
    torch.testing.assert_close(fused[2], h_s.grad, **tol)
    torch.testing.assert_close(fused[3], w_s.grad, **tol)
    assert (fused[0][~mask] == 0).all() and (fused[2][~mask] == 0).all()


def test_head_kd_losses_gradient_reaches_a_generated_head() -> None:
    """A head made from a projection (a low-rank clone's E_T @ P) gets its gradient through
    autograd, equal to the logits path's."""
    h_s, _, h_t, w_t, targets, mask = _head_inputs(torch.float64)
    proj = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    div, ce = head_kd_losses(h_s, w_t @ proj, h_t, w_t, targets, mask, chunk_size=4)
    (div.sum() + ce.sum()).backward()
    fused = proj.grad.clone()
    proj.grad = None
    s_logits = h_s @ (w_t @ proj).t()
    ref = kd_divergence(s_logits, h_t @ w_t.t(), mask=mask).sum()
    (ref + chunked_cross_entropy(s_logits, targets, mask).sum()).backward()
    torch.testing.assert_close(fused, proj.grad, rtol=1e-10, atol=1e-12)


def test_head_kd_losses_under_cpu_autocast_match_bf16_logits() -> None:
    """Under autocast the heads' matmuls run in bf16, as the models' own heads would."""
    h_s, w_s, h_t, w_t, targets, mask = _head_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        div, ce = head_kd_losses(h_s, w_s, h_t, w_t, targets, mask, chunk_size=5)
        s_logits, t_logits = h_s @ w_s.t(), h_t @ w_t.t()
        assert s_logits.dtype == torch.bfloat16
        ref = kd_divergence(s_logits, t_logits, mask=mask)
    torch.testing.assert_close(div, ref, rtol=1e-5, atol=1e-6)
    (div.sum() + ce.sum()).backward()
    assert h_s.grad.dtype == torch.float32 and w_s.grad.dtype == torch.float32


def test_head_kd_losses_check_vocabularies() -> None:
    h_s, w_s, h_t, w_t, targets, mask = _head_inputs(torch.float32)
    with pytest.raises(ValueError, match="shared vocabulary"):
        head_kd_losses(h_s, w_s[:-1], h_t, w_t, targets, mask)
