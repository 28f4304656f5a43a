"""Token-level distillation losses computed in memory-bounded chunks.

Conventions:

* The **teacher** distribution is ``p = softmax(teacher_logits / T)`` and the **student**
  distribution is ``q = softmax(student_logits / T)``, both over the last (vocabulary) dimension.
  ``forward_kl`` is ``KL(p || q)`` (mode covering), ``reverse_kl`` is ``KL(q || p)`` (mode
  seeking).
* ``jsd`` is the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024), in the
  convention of Hugging Face TRL's ``generalized_jsd_loss``: with ``M = beta * p + (1 - beta) * q``
  it is ``beta * KL(p || M) + (1 - beta) * KL(q || M)``. The divergence itself tends to 0 at both
  ends, but its normalised limits are the two KLs (``JSD / beta -> KL(p || q)`` as ``beta -> 0``
  and ``JSD / (1 - beta) -> KL(q || p)`` as ``beta -> 1``), so ``beta == 0`` is defined to be
  forward KL and ``beta == 1`` reverse KL.
* ``skew_forward_kl`` / ``skew_reverse_kl`` are DistiLLM's skewed KLs (Ko et al., 2024):
  ``KL(p || a * p + (1 - a) * q)`` and ``KL(q || a * q + (1 - a) * p)`` with ``a = skew_alpha``.
* ``tvd`` is the total variation distance ``0.5 * sum |p - q|``.
* A cached teacher gives only its top-k tokens and the mass outside them:
  :func:`top_k_kd_divergence` takes the same divergences between the k + 1-bucket coarsenings
  of both distributions (a lower bound of the full divergence, equal when k covers the
  vocabulary).
* The temperature divides both logits; no ``T**2`` gradient correction is applied here.
* All arithmetic is done in ``torch.promote_types(dtype, float32)`` (float32 for bf16/fp16/fp32
  logits), probabilities that are exactly zero (e.g. from ``-inf`` logits) contribute zero, and
  values come back as per-token losses that are zero at masked-out positions.

Memory: the logits are viewed as ``[N, V]`` rows (without copying, also for views such as
``logits[:, :-1]`` whose leading dimensions do not merge) and processed by a custom autograd
function a chunk of rows at a time, in the forward pass and again in the backward pass, where
each chunk is recomputed and differentiated on its own. Only the inputs are saved for backward,
so the extra memory is the ``[N]`` outputs, the unavoidable ``[N, V]`` gradient in the input
dtype, and a handful of float32 temporaries of one chunk; never a full ``[N, V]`` float32
tensor. By default a chunk holds about ``2**24`` logits on accelerators and ``2**20`` on CPU.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = [
    "DIVERGENCE_KINDS",
    "REDUCTIONS",
    "DivergenceKind",
    "KDDivergence",
    "Reduction",
    "TopKTeacher",
    "chunked_cross_entropy",
    "head_kd_losses",
    "kd_divergence",
    "top_k_kd_divergence",
]

DivergenceKind = Literal[
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"
]
DIVERGENCE_KINDS: tuple[str, ...] = get_args(DivergenceKind)

Reduction = Literal["none", "sum", "mean", "per_example"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)

# Elements of one float32 chunk temporary when chunk_size is None; rows per chunk = this // V.
# Accelerators: 2**24 (64 MiB), large enough that kernel launches and the per-chunk mask check
# stay cheap. CPU: 2**20 (4 MiB). glibc serves blocks up to 32 MiB from a heap that fragments
# as chunk temporaries come and go (measured: ~+300 MiB peak RSS at 16-32 MiB temporaries), and
# larger blocks from fresh mmaps that page-fault on every chunk; 4 MiB blocks avoid both.
_AUTO_CHUNK_ELEMENTS_CPU = 2**20
_AUTO_CHUNK_ELEMENTS_ACCELERATOR = 2**24

RowFn = Callable[..., Tensor]


class TopKTeacher(NamedTuple):
    """A sparse teacher distribution per position, as a teacher cache stores it.

    Attributes:
        ids: the top-k token ids ``[..., k]``.
        logprobs: their log-probabilities ``[..., k]``.
        tail_logprob: the log of the mass outside them ``[...]``.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor


def kd_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    chunk_size: int | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """Divergence between the teacher's and the student's next-token distributions.

    Args:
        student_logits: Student logits of shape ``[..., V]`` (typically ``[B, L, V]``), any
            floating dtype.
        teacher_logits: Teacher logits of exactly the same shape (align the vocabularies first).
        kind: One of ``forward_kl`` (``KL(teacher || student)``), ``reverse_kl``
            (``KL(student || teacher)``), ``jsd`` (generalised JSD weighted by ``beta``),
            ``skew_forward_kl``, ``skew_reverse_kl`` (DistiLLM skewed KLs, mixing weight
            ``skew_alpha``) or ``tvd`` (total variation distance).
        temperature: Softmax temperature applied to both logits; must be positive.
        mask: Tokens to include, broadcastable to ``student_logits.shape[:-1]``; bool or 0/1
            (nonzero entries count). ``None`` includes every token.
        beta: JSD teacher weight in ``[0, 1]``: ``M = beta * p + (1 - beta) * q`` and the loss is
            ``beta * KL(p || M) + (1 - beta) * KL(q || M)``. ``0`` gives forward KL and ``1``
            reverse KL, the limits of the JSD divided by ``beta`` and ``1 - beta``.
        skew_alpha: Skew in ``[0, 1)`` for the skewed KLs; ``0`` gives the plain KL.
        chunk_size: Rows (tokens) per chunk. ``None`` picks ``max(1, 2**24 // V)`` rows on
            accelerators (about 64 MiB per float32 temporary) and ``max(1, 2**20 // V)`` on CPU.
        reduction: ``none`` returns per-token values of shape ``logits.shape[:-1]`` (zero where
            masked out); ``sum`` their sum; ``mean`` the sum over the number of unmasked tokens;
            ``per_example`` one such mean per index of the first dimension (shape ``[B]``), so
            examples can be weighted. Empty selections give 0, never NaN.

    Returns:
        The reduced loss, in float32 (float64 for float64 inputs).

    Raises:
        ValueError: On an unknown ``kind`` or ``reduction``, mismatched logit shapes, a mask that
            does not broadcast, or an out-of-range ``temperature``, ``beta``, ``skew_alpha`` or
            ``chunk_size``.
    """
    _check_divergence_args(kind, temperature, beta, skew_alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape; align the vocabularies first"
        )
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise ValueError("Logits must be floating point tensors")

    row_fn = functools.partial(
        _divergence_rows, kind=kind, temperature=temperature, beta=beta, skew_alpha=skew_alpha
    )
    compute_dtype = _compute_dtype(student_logits.dtype, teacher_logits.dtype)
    return _chunked_loss(
        student_logits, teacher_logits, mask, row_fn, compute_dtype, chunk_size, reduction
    )


def chunked_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """Cross-entropy of logits against integer targets, computed in chunks of tokens.

    Args:
        logits: Logits of shape ``[..., V]``, any floating dtype.
        targets: Integer class indices of shape ``logits.shape[:-1]``, already aligned with the
            logits (``targets[i]`` is the label for ``logits[i]``). Masked-out positions may hold
            any value (e.g. ``-100``); unmasked ones must be in ``[0, V)``.
        mask: Tokens to include, broadcastable to ``logits.shape[:-1]``; bool or 0/1. ``None``
            includes every token.
        chunk_size: Rows (tokens) per chunk; ``None`` chooses as in :func:`kd_divergence`.
        reduction: ``none``, ``sum``, ``mean`` or ``per_example``, as in :func:`kd_divergence`.

    Returns:
        The reduced loss, in float32 (float64 for float64 logits).

    Raises:
        ValueError: On mismatched shapes, non-integer targets, a mask that does not broadcast, an
            unknown ``reduction`` or a bad ``chunk_size``.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"Targets {tuple(targets.shape)} must have the logits' shape without the vocabulary "
            f"dimension, {tuple(logits.shape[:-1])}"
        )
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"Targets must be integer class indices, got dtype {targets.dtype}")
    if not logits.is_floating_point():
        raise ValueError("Logits must be a floating point tensor")

    batch_shape = logits.shape[:-1]
    keep = _broadcast_mask(mask, batch_shape, logits.device)
    # Masked-out targets (e.g. -100) are replaced by a valid index so gather never fails.
    safe_targets = targets.masked_fill(~keep, 0).unsqueeze(-1)
    compute_dtype = _compute_dtype(logits.dtype)
    return _chunked_loss(
        logits, safe_targets, keep, _cross_entropy_rows, compute_dtype, chunk_size, reduction
    )


def top_k_kd_divergence(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail_logprob: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    chunk_size: int | None = None,
    reduction: Reduction = "none",
) -> Tensor:
    """Divergence between a sparse teacher (its top-k tokens and the mass outside them) and the
    student's full next-token distribution, as from a teacher cache.

    Both distributions are coarsened to the same k + 1 outcomes: each of the teacher's k tokens,
    and one tail bucket holding everything else (the teacher's stored tail mass; the student's
    mass outside those k tokens). The divergence ``kind`` is then taken between the two
    coarsened distributions, exactly as :func:`kd_divergence` takes it between full ones. The
    teacher's k + 1 log-probabilities are renormalised first (rounding in fp16 storage leaves
    their sum a little off 1).

    Bias: every divergence here is an f-divergence, and merging outcomes can only lower an
    f-divergence (the data-processing inequality), so the value is a lower bound of the full
    one, equal when the student's distribution within the tail is proportional to the
    teacher's, and in particular when the top-k covers the vocabulary (tail mass 0): then this
    equals :func:`kd_divergence` on the full logits, value and gradient. Within the tail the
    student's tokens get one gradient, that of the bucket: the loss moves the tail's total mass
    and leaves its shape alone. Dropping the tail instead (renormalising over the top-k) would
    also bias the loss, and is not offered.

    Args:
        student_logits: Student logits ``[..., V]``.
        teacher_ids: The teacher's top-k token ids ``[..., k]`` (any integer dtype), distinct
            within a row and in ``[0, V)``.
        teacher_logprobs: Their log-probabilities ``[..., k]`` at ``temperature``.
        teacher_tail_logprob: The log of the teacher's mass outside them ``[...]`` (``-inf`` when
            the top-k holds it all).
        kind, beta, skew_alpha: the divergence, as in :func:`kd_divergence`.
        temperature: divides the student's logits; the teacher's log-probabilities must have been
            taken at the same temperature (they are not re-tempered: the tail cannot be).
        mask: Tokens to include, broadcastable to ``student_logits.shape[:-1]``.
        chunk_size: Rows per chunk; ``None`` chooses as in :func:`kd_divergence`.
        reduction: ``none``, ``sum``, ``mean`` or ``per_example``, as in :func:`kd_divergence`.

    Returns:
        The reduced loss, in float32 (float64 for float64 inputs). Only the student's logits get
        a gradient.

    Raises:
        ValueError: On shapes that do not match, non-integer ids, or the argument errors of
            :func:`kd_divergence`.
    """
    _check_divergence_args(kind, temperature, beta, skew_alpha)
    batch_shape = student_logits.shape[:-1]
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:-1] != batch_shape:
        raise ValueError(
            f"Teacher top-k ids {tuple(teacher_ids.shape)} and log-probs "
            f"{tuple(teacher_logprobs.shape)} must both be the student logits' leading shape "
            f"{tuple(batch_shape)} followed by k"
        )
    if teacher_tail_logprob.shape != batch_shape:
        raise ValueError(
            f"Teacher tail log-probs {tuple(teacher_tail_logprob.shape)} must have the student "
            f"logits' leading shape {tuple(batch_shape)}"
        )
    if teacher_ids.is_floating_point() or not student_logits.is_floating_point():
        raise ValueError("Teacher ids must be integers and student logits floating point")
    if teacher_ids.shape[-1] > student_logits.shape[-1]:
        raise ValueError(
            f"The teacher keeps {teacher_ids.shape[-1]} tokens per position, more than the "
            f"student's {student_logits.shape[-1]} logits"
        )
    row_fn = functools.partial(
        _top_k_divergence_rows, kind=kind, temperature=temperature, beta=beta,
        skew_alpha=skew_alpha,
    )  # fmt: skip
    compute_dtype = _compute_dtype(student_logits.dtype, teacher_logprobs.dtype)
    tail = teacher_tail_logprob.unsqueeze(-1)
    return _chunked_loss(
        student_logits, teacher_logprobs, mask, row_fn, compute_dtype, chunk_size, reduction,
        extra=(teacher_ids, tail),
    )  # fmt: skip


def head_kd_losses(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    targets: Tensor,
    mask: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token divergence and student cross-entropy straight from the final hidden states
    and the LM heads, never materialising ``[tokens, V]`` logits of either model.

    Equal to ``kd_divergence(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T,
    ...)`` and ``chunked_cross_entropy(student_logits, targets, mask)`` with ``reduction="none"``,
    but the logits are made a chunk of selected tokens at a time, in the forward pass and again
    in the backward pass, which returns the gradients of the student's hidden states and head
    directly. Only the ``mask``-selected tokens are computed at all (prompts and padding cost
    nothing). The heads' matmuls run in the autocast dtype when autocast is on (as the models'
    own heads would), the divergence in float32.

    Args:
        student_hidden: The student's final (normed) hidden states ``[..., d_S]``.
        student_head: Its LM head weight ``[V, d_S]`` (may require grad, e.g. a generated one).
        teacher_hidden: The teacher's final hidden states ``[..., d_T]`` (no grad).
        teacher_head: Its LM head weight ``[V, d_T]`` (no grad); align the vocabularies first
            (slice both heads to the shared rows).
        targets: Next-token ids of ``student_hidden.shape[:-1]`` for the cross-entropy.
        mask: Tokens to include, of the same shape (bool or 0/1).
        kind, temperature, beta, skew_alpha: the divergence, as in :func:`kd_divergence`.
        chunk_size: Selected tokens per chunk; ``None`` takes the larger of the logits path's
            chunk and ``1 / (V // d)`` of the selected tokens (d the wider hidden size), so
            that the heads, read whole by every chunk, are read at most about ``V / d`` times.

    Returns:
        ``(divergence, cross_entropy)``, each of shape ``student_hidden.shape[:-1]`` in float32
        (float64 for float64 inputs), zero where masked out.
    """
    _check_divergence_args(kind, temperature, beta, skew_alpha)
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(
            f"The heads predict {student_head.shape[0]} (student) and {teacher_head.shape[0]} "
            "(teacher) tokens; slice both to the shared vocabulary first"
        )
    batch_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != batch_shape or targets.shape != batch_shape:
        raise ValueError(
            f"Hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} and "
            f"targets {tuple(targets.shape)} must share their leading dimensions"
        )
    keep = _broadcast_mask(mask, batch_shape, student_hidden.device).reshape(-1)
    if chunk_size is not None:
        _check_chunk_size(chunk_size)
    row_fn = functools.partial(
        _divergence_rows, kind=kind, temperature=temperature, beta=beta, skew_alpha=skew_alpha
    )
    device = student_hidden.device.type
    matmul_dtype = (
        torch.get_autocast_dtype(device)
        if torch.is_autocast_enabled(device)
        else torch.promote_types(student_hidden.dtype, student_head.dtype)
    )
    divergence, cross_entropy = _FusedHeadLoss.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_head,
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher_head,
        targets.reshape(-1),
        keep,
        row_fn,
        matmul_dtype,
        chunk_size,
    )
    return divergence.reshape(batch_shape), cross_entropy.reshape(batch_shape)


def _head_chunk_rows(selected: int, vocab: int, width: int, device: torch.device) -> int:
    """Rows per chunk of the fused head path. Every chunk reads both heads whole, so chunks
    must not be too small: at most about ``V / d`` of them (Liger's rule; one chunk's logits are
    then about the hidden states' size), and at least the logits path's chunk."""
    on_cpu = device.type == "cpu"
    elements = _AUTO_CHUNK_ELEMENTS_CPU if on_cpu else _AUTO_CHUNK_ELEMENTS_ACCELERATOR
    n_chunks = max(1, vocab // max(width, 1))
    return max(1, elements // max(vocab, 1), -(-selected // n_chunks))


class _FusedHeadLoss(torch.autograd.Function):
    """Divergence and cross-entropy rows from hidden states and heads, chunk by chunk, with the
    logits recomputed per chunk in backward. Inputs are flattened ``[N, d]`` hidden states, the
    ``[V, d]`` heads, ``[N]`` targets and a bool ``[N]`` mask; outputs two ``[N]`` float32
    tensors."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        student_hidden: Tensor,
        student_head: Tensor,
        teacher_hidden: Tensor,
        teacher_head: Tensor,
        targets: Tensor,
        keep: Tensor,
        row_fn: RowFn,
        matmul_dtype: torch.dtype,
        chunk_rows: int | None,
    ) -> tuple[Tensor, Tensor]:
        index = keep.nonzero().squeeze(-1)  # the step's one host sync: the selected count
        if chunk_rows is None:
            width = max(student_hidden.shape[-1], teacher_hidden.shape[-1])
            chunk_rows = _head_chunk_rows(index.shape[0], student_head.shape[0], width, keep.device)
        h_s, h_t = student_hidden[index], teacher_hidden[index]  # only the selected tokens
        target = targets[index].unsqueeze(-1)
        dtype = _compute_dtype(matmul_dtype)
        divergence = torch.zeros(index.shape[0], dtype=dtype, device=keep.device)
        cross_entropy = torch.zeros_like(divergence)
        for start in range(0, index.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            s = _head_logits(h_s[rows], student_head, matmul_dtype)
            t = _head_logits(h_t[rows], teacher_head, matmul_dtype)
            divergence[rows] = row_fn(s, t)
            cross_entropy[rows] = _cross_entropy_rows(s, target[rows])
        ctx.save_for_backward(h_s, student_head, h_t, teacher_head, target, index)
        ctx.row_fn, ctx.matmul_dtype, ctx.chunk_rows = row_fn, matmul_dtype, chunk_rows
        ctx.n_rows = keep.shape[0]
        zeros = torch.zeros(keep.shape[0], dtype=dtype, device=keep.device)
        return zeros.index_copy(0, index, divergence), zeros.index_copy(0, index, cross_entropy)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_divergence: Tensor, grad_cross_entropy: Tensor
    ) -> tuple[Tensor | None, ...]:
        h_s, student_head, h_t, teacher_head, target, index = ctx.saved_tensors
        need_hidden, need_head = ctx.needs_input_grad[:2]
        grad_div, grad_ce = grad_divergence[index], grad_cross_entropy[index]
        grad_h = torch.zeros_like(h_s) if need_hidden else None
        accumulate = _compute_dtype(student_head.dtype)  # float32 (float64 for float64 heads)
        grad_head = torch.zeros(student_head.shape, dtype=accumulate, device=h_s.device)
        for start in range(0, index.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            with torch.enable_grad():
                s = _head_logits(h_s[rows], student_head, ctx.matmul_dtype).detach()
                s.requires_grad_(True)
                t = _head_logits(h_t[rows], teacher_head, ctx.matmul_dtype)
                loss = (ctx.row_fn(s, t) * grad_div[rows]).sum()
                loss = loss + (_cross_entropy_rows(s, target[rows]) * grad_ce[rows]).sum()
                (grad_logits,) = torch.autograd.grad(loss, s)
            grad_logits = grad_logits.to(ctx.matmul_dtype)
            if need_hidden:
                grad_h[rows] = grad_logits @ student_head.to(ctx.matmul_dtype)
            if need_head:
                grad_head.addmm_(grad_logits.t().to(accumulate), h_s[rows].to(accumulate))
        grad_hidden = None
        if need_hidden:
            full = torch.zeros((ctx.n_rows, h_s.shape[-1]), dtype=h_s.dtype, device=h_s.device)
            grad_hidden = full.index_copy(0, index, grad_h.to(h_s.dtype))
        grad_head_out = grad_head.to(student_head.dtype) if need_head else None
        return grad_hidden, grad_head_out, None, None, None, None, None, None, None


def _head_logits(hidden: Tensor, head: Tensor, matmul_dtype: torch.dtype) -> Tensor:
    """``hidden @ head.T`` in ``matmul_dtype`` (as the model's head would be under autocast),
    returned in float32 (or float64) for the loss."""
    logits = torch.nn.functional.linear(hidden.to(matmul_dtype), head.to(matmul_dtype))
    return logits.to(_compute_dtype(matmul_dtype))


class KDDivergence(nn.Module):
    """Module form of :func:`kd_divergence` that holds the divergence's settings.

    Args:
        kind: Divergence, one of :data:`DIVERGENCE_KINDS`.
        temperature: Softmax temperature applied to both logits.
        beta: JSD teacher weight in ``[0, 1]`` (used by ``jsd`` only).
        skew_alpha: Skew in ``[0, 1)`` (used by the skewed KLs only).
        chunk_size: Rows (tokens) per chunk; ``None`` chooses automatically.
    """

    def __init__(
        self,
        kind: DivergenceKind = "forward_kl",
        temperature: float = 1.0,
        *,
        beta: float = 0.5,
        skew_alpha: float = 0.1,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.temperature = temperature
        self.beta = beta
        self.skew_alpha = skew_alpha
        self.chunk_size = chunk_size
        # Fail at construction rather than at the first training step.
        _check_divergence_args(kind, temperature, beta, skew_alpha)
        if chunk_size is not None:
            _check_chunk_size(chunk_size)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor | None = None,
        reduction: Reduction = "none",
    ) -> Tensor:
        """Computes the divergence; see :func:`kd_divergence` for the arguments.

        Args:
            student_logits: Student logits ``[..., V]``.
            teacher_logits: Teacher logits of the same shape.
            mask: Tokens to include, broadcastable to ``student_logits.shape[:-1]``.
            reduction: ``none``, ``sum``, ``mean`` or ``per_example``.

        Returns:
            The reduced loss.
        """
        return kd_divergence(
            student_logits,
            teacher_logits,
            self.kind,
            self.temperature,
            mask,
            beta=self.beta,
            skew_alpha=self.skew_alpha,
            chunk_size=self.chunk_size,
            reduction=reduction,
        )

    def top_k(
        self,
        student_logits: Tensor,
        teacher_ids: Tensor,
        teacher_logprobs: Tensor,
        teacher_tail_logprob: Tensor,
        mask: Tensor | None = None,
        reduction: Reduction = "none",
    ) -> Tensor:
        """The divergence against a sparse (cached) teacher; see :func:`top_k_kd_divergence`."""
        return top_k_kd_divergence(
            student_logits, teacher_ids, teacher_logprobs, teacher_tail_logprob, self.kind,
            self.temperature, mask, beta=self.beta, skew_alpha=self.skew_alpha,
            chunk_size=self.chunk_size, reduction=reduction,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, temperature={self.temperature}, beta={self.beta}, "
            f"skew_alpha={self.skew_alpha}, chunk_size={self.chunk_size}"
        )


# --------------------------------------------------------------------------------------------
# Row functions: [n, V] float rows (and the other input's rows) -> [n] per-row values.
# --------------------------------------------------------------------------------------------


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(P || Q)`` per row from log-probabilities, with ``0 * log 0 = 0``."""
    p = log_p.exp()
    # Select before multiplying: where p == 0, log_p - log_q may be -inf - -inf = NaN, and
    # masking only the product would still send NaN into the gradient.
    log_ratio = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * log_ratio).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """``log(weight * P + (1 - weight) * Q)`` for ``0 <= weight < 1``, computed stably."""
    if weight == 0.0:
        return log_q
    # Clamping -inf to the most negative finite value keeps logaddexp's gradient finite where
    # both probabilities are zero (its backward evaluates exp(-inf - -inf) there).
    floor = torch.finfo(log_p.dtype).min
    return torch.logaddexp(
        log_p.clamp_min(floor) + math.log(weight), log_q.clamp_min(floor) + math.log1p(-weight)
    )


def _divergence_rows(
    student: Tensor,
    teacher: Tensor,
    *,
    kind: str,
    temperature: float,
    beta: float,
    skew_alpha: float,
) -> Tensor:
    """Per-row divergence between teacher rows (``p``) and student rows (``q``)."""
    if temperature != 1.0:
        student = student / temperature
        teacher = teacher / temperature
    if kind == "tvd":
        return 0.5 * (teacher.softmax(-1) - student.softmax(-1)).abs().sum(-1)
    return _log_prob_divergence(
        student.log_softmax(-1), teacher.log_softmax(-1), kind=kind, beta=beta,
        skew_alpha=skew_alpha,
    )  # fmt: skip


def _log_prob_divergence(
    log_q: Tensor, log_p: Tensor, *, kind: str, beta: float, skew_alpha: float
) -> Tensor:
    """Per-row divergence between normalised teacher (``log_p``) and student (``log_q``)
    log-probabilities."""
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(log_p, log_q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if kind == "skew_forward_kl":
        return _kl(log_p, _log_mixture(log_p, log_q, skew_alpha))
    if kind == "skew_reverse_kl":
        return _kl(log_q, _log_mixture(log_q, log_p, skew_alpha))
    raise AssertionError(f"unhandled divergence kind {kind!r}")


def _top_k_divergence_rows(
    student: Tensor,
    teacher_logprobs: Tensor,
    teacher_ids: Tensor,
    teacher_tail: Tensor,
    *,
    kind: str,
    temperature: float,
    beta: float,
    skew_alpha: float,
) -> Tensor:
    """Per-row divergence between a sparse teacher's k + 1 buckets (top-k tokens and tail) and
    the student's mass on the same buckets (see :func:`top_k_kd_divergence`)."""
    if temperature != 1.0:
        student = student / temperature
    log_q = student.log_softmax(-1)
    index = teacher_ids.long()
    # The student's tail: its log-mass outside the teacher's tokens. Those are replaced by the
    # most negative finite value rather than -inf: with an empty tail (k = V) logsumexp of all
    # -inf would send NaN into the gradient; this way the tail is ~exp(-3e38) = 0, exactly.
    floor = torch.finfo(log_q.dtype).min
    log_q_tail = log_q.scatter(-1, index, floor).logsumexp(-1, keepdim=True)
    student_buckets = torch.cat([log_q.gather(-1, index), log_q_tail], dim=-1)
    teacher_buckets = torch.cat([teacher_logprobs, teacher_tail], dim=-1).log_softmax(-1)
    return _log_prob_divergence(
        student_buckets, teacher_buckets, kind=kind, beta=beta, skew_alpha=skew_alpha
    )


def _cross_entropy_rows(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy; ``targets`` is ``[n, 1]`` of valid class indices."""
    return logits.logsumexp(-1) - logits.gather(-1, targets).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Chunked evaluation.
# --------------------------------------------------------------------------------------------


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def _check_divergence_args(kind: str, temperature: float, beta: float, skew_alpha: float) -> None:
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(
            f"Unknown divergence kind {kind!r}; expected one of: {', '.join(DIVERGENCE_KINDS)}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1), got {skew_alpha}")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _broadcast_mask(mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """The mask as a bool tensor of exactly ``shape``."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    try:
        expanded = torch.broadcast_to(mask, shape)
    except RuntimeError as error:
        raise ValueError(
            f"Mask of shape {tuple(mask.shape)} does not broadcast to {tuple(shape)}"
        ) from error
    return expanded if expanded.dtype == torch.bool else expanded != 0


def _chunked_loss(
    student: Tensor,
    other: Tensor,
    mask: Tensor | None,
    row_fn: RowFn,
    compute_dtype: torch.dtype,
    chunk_size: int | None,
    reduction: str,
    extra: tuple[Tensor, ...] = (),
) -> Tensor:
    """Flattens to rows, runs ``row_fn`` chunk by chunk and applies the reduction."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"Unknown reduction {reduction!r}; expected one of: {', '.join(REDUCTIONS)}"
        )
    batch_shape = student.shape[:-1]
    if reduction == "per_example" and len(batch_shape) == 0:
        raise ValueError("reduction='per_example' needs logits with a batch dimension")
    vocab = student.shape[-1]
    if chunk_size is None:
        on_cpu = student.device.type == "cpu"
        elements = _AUTO_CHUNK_ELEMENTS_CPU if on_cpu else _AUTO_CHUNK_ELEMENTS_ACCELERATOR
        chunk_size = max(1, elements // max(vocab, 1))
    _check_chunk_size(chunk_size)

    keep = _broadcast_mask(mask, batch_shape, student.device)
    values = _ChunkedRowLoss.apply(
        student, other, keep.reshape(-1), row_fn, compute_dtype, chunk_size, extra
    ).reshape(batch_shape)

    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.sum() / keep.sum().clamp_min(1)
    examples = (batch_shape[0], math.prod(batch_shape[1:]))
    return values.reshape(examples).sum(-1) / keep.reshape(examples).sum(-1).clamp_min(1)


class _ChunkedRowLoss(torch.autograd.Function):
    """Per-row loss over the rows of ``[..., V]`` tensors, chunk by chunk, with each chunk's
    gradient taken in the same pass.

    Inputs: ``student`` logits ``[..., V]``, ``other`` (teacher logits ``[..., V]`` or integer
    targets ``[..., 1]``), a bool ``keep`` mask over the ``N`` flattened rows, the row function,
    the compute dtype, the rows per chunk, and ``extra`` row-aligned tensors that the row
    function also reads and that take no gradient (a cached teacher's token ids and tail).
    Output: ``[N]`` values in the compute dtype, zero where ``keep`` is false. Gradients come
    back contiguous, in each input's dtype.

    Every row's value depends on that row's logits only, so when an input needs a gradient the
    forward pass also takes ``d value_i / d logits_i`` of each chunk (one autograd pass over the
    chunk it has just computed) and keeps them; backward only scales row ``i`` by the incoming
    ``grad_values[i]``, in place. Nothing is recomputed in backward (this class used to run
    every chunk's forward twice), the inputs themselves are not kept (the teacher's logits can
    be freed as soon as the loss is computed), and the memory held between forward and backward
    is one gradient per differentiable input, the buffer backward returns. A graph retained for
    a second backward is refused by autograd's check of saved tensors.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        student: Tensor,
        other: Tensor,
        keep: Tensor,
        row_fn: RowFn,
        compute_dtype: torch.dtype,
        chunk_rows: int,
        extra: tuple[Tensor, ...] = (),
    ) -> Tensor:
        # Autograd runs forward under no_grad, so the chunk temporaries are freed right away.
        inputs = (student, other)
        need = ctx.needs_input_grad[:2]
        rows_of = [_Rows(x) for x in inputs]
        extra_rows = [_Rows(x) for x in extra]
        values = torch.zeros(keep.shape[0], dtype=compute_dtype, device=student.device)
        # Unit gradients in the input's dtype and layout (contiguous): the buffer backward
        # scales in place and returns, so the loss holds no more memory than one gradient.
        grads = [_new_grad(x) if n else None for x, n in zip(inputs, need, strict=True)]
        grad_rows = [g.view(-1, g.shape[-1]) for g in grads if g is not None]
        for rows in _chunks(chunk_rows, *rows_of, *extra_rows):
            keep_rows = keep[rows]
            if not keep_rows.any():
                for grad in grad_rows:
                    grad[rows].zero_()
                continue
            chunks = [_upcast(x[rows], compute_dtype) for x in rows_of]
            extras = [_upcast(x[rows], compute_dtype) for x in extra_rows]
            if not grad_rows:
                chunk = row_fn(*chunks, *extras)
            else:
                with torch.enable_grad():
                    pairs = zip(chunks, need, strict=True)
                    chunks = [c.detach().requires_grad_(n) for c, n in pairs]
                    chunk = row_fn(*chunks, *extras)
                    # grad_outputs = keep: masked-out rows get no gradient; where, below, keeps
                    # inf/NaN in them out (0 * inf would be NaN).
                    chunk_grads = torch.autograd.grad(
                        chunk,
                        [c for c in chunks if c.requires_grad],
                        grad_outputs=keep_rows.to(chunk.dtype),
                    )
                chunk = chunk.detach()
                masked_out = None if keep_rows.all() else ~keep_rows.unsqueeze(-1)
                for grad, chunk_grad in zip(grad_rows, chunk_grads, strict=True):
                    grad[rows].copy_(chunk_grad)
                    if masked_out is not None:
                        grad[rows].masked_fill_(masked_out, 0.0)
                del chunk_grads
            # where rather than multiply, so garbage (inf/NaN) in masked-out rows cannot leak.
            values[rows] = torch.where(keep_rows, chunk, 0.0)
            del chunks, chunk, extras
        ctx.present = [g is not None for g in grads]
        ctx.chunk_rows = chunk_rows
        ctx.save_for_backward(keep, *[g for g in grads if g is not None])
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_values: Tensor) -> tuple[Tensor | None, ...]:
        # The unit gradients are scaled in place and handed on, so a second backward through
        # a retained graph fails in autograd's check of saved tensors instead of going wrong.
        keep, *saved = ctx.saved_tensors
        scale = torch.where(keep, grad_values, 0.0).unsqueeze(-1)
        unit = iter(saved)
        out = [next(unit) if present else None for present in ctx.present]
        for grad in out:
            if grad is None:
                continue
            rows = grad.view(-1, grad.shape[-1])
            # A chunk at a time: a bf16 gradient times the float32 scale makes float32
            # temporaries of the size of what is multiplied.
            for start in range(0, rows.shape[0], ctx.chunk_rows):
                chunk = slice(start, start + ctx.chunk_rows)
                rows[chunk].mul_(scale[chunk])
        return out[0], out[1], None, None, None, None, None


class _Rows:
    """The rows of a ``[..., D]`` tensor, flattened to ``[N, D]`` without copying.

    ``reshape(-1, D)`` copies when the leading dimensions cannot be merged, as for
    ``logits[:, :-1]`` (dropping the last position of every sequence). Such tensors are split
    along their leading dimensions into blocks that are 2-D views, and a slice of rows is taken
    from the block holding it, so slices must not cross block boundaries (see :func:`_chunks`).
    """

    def __init__(self, x: Tensor) -> None:
        self.blocks = _row_blocks(x)
        self.starts = list(itertools.accumulate((len(block) for block in self.blocks), initial=0))

    def __getitem__(self, rows: slice) -> Tensor:
        index = bisect.bisect_right(self.starts, rows.start) - 1
        offset = self.starts[index]
        return self.blocks[index][rows.start - offset : rows.stop - offset]


def _row_blocks(x: Tensor) -> list[Tensor]:
    if x.dim() <= 2:
        return [x.reshape(-1, x.shape[-1])]  # a view for 1-D and 2-D tensors
    try:
        return [x.view(-1, x.shape[-1])]
    except RuntimeError:  # leading dimensions that do not merge: split the first one
        return [block for sub in x.unbind(0) for block in _row_blocks(sub)]


def _chunks(chunk_rows: int, *tensors: _Rows) -> list[slice]:
    """Slices of at most ``chunk_rows`` rows that stay within every tensor's blocks."""
    bounds = sorted({start for rows in tensors for start in rows.starts})
    return [
        slice(start, min(start + chunk_rows, end))
        for begin, end in itertools.pairwise(bounds)
        for start in range(begin, end, chunk_rows)
    ]


def _new_grad(x: Tensor) -> Tensor:
    # Contiguous, whatever x's strides, so that it can be viewed as [N, D] rows.
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _upcast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype) if x.is_floating_point() else x
