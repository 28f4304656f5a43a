"""Projection initialisations of a Low-Rank Clone: ``normal``, ``embedding_pca``,
``activation_pca`` (docs/lowrank.md derives the last one).

Each initialisation writes the clone's projections (and, for a tied teacher under
``activation_pca``, the final norm gain) in place, without gradient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lrkd.models.lowrank.clone import LowRankClone

__all__ = [
    "INITS",
    "init_activation_pca",
    "init_embedding_pca",
    "init_normal",
    "initialise",
    "missing_probe_message",
]

log = logging.getLogger("lrkd")

INITS: tuple[str, ...] = ("normal", "embedding_pca", "activation_pca")
"""Projection initialisations; see :class:`~lrkd.models.lowrank.LowRankClone`."""


def missing_probe_message(who: str) -> str:
    """The error message for an ``activation_pca`` init without probe token ids.

    Args:
        who: what was called without them (starts the message).

    Returns:
        A message that names the ways to give them (or to do without).
    """
    return (
        f"{who}: init=activation_pca needs probe_input_ids, token ids [B, L] of text the "
        "teacher is run on. Build them with probe_batch(tokenizer) from lrkd's data.probe "
        "module (the teacher's tokenizer; the built-in corpus unless texts are given), or use "
        "LowRankCloneBuilder as the DistillationModule's student (it builds the probe from the "
        "teacher's tokenizer), or use init=embedding_pca (no data needed)."
    )


def initialise(
    clone: LowRankClone,
    init: str,
    init_std: float = 0.02,
    seed: int | None = None,
    probe_input_ids: torch.Tensor | None = None,
) -> None:
    """Initialise ``clone``'s projections with the initialisation named ``init``.

    Args:
        clone: the clone.
        init: one of :data:`INITS`.
        init_std: standard deviation of ``normal``.
        seed: seed of ``normal`` (``None``: the global RNG).
        probe_input_ids: token ids [B, L] for ``activation_pca``.

    Raises:
        ValueError: ``init`` is unknown, or ``activation_pca`` has no ``probe_input_ids``.
    """
    if init == "normal":
        init_normal(clone, init_std, seed)
    elif init == "embedding_pca":
        init_embedding_pca(clone)
    elif init == "activation_pca":
        if probe_input_ids is None:
            raise ValueError(missing_probe_message("LowRankClone"))
        init_activation_pca(clone, probe_input_ids)
    else:
        raise ValueError(f"LowRankClone: init={init!r}; choose one of {', '.join(INITS)}.")


@torch.no_grad()
def init_normal(clone: LowRankClone, std: float, seed: int | None) -> None:
    """The paper's initialisation: every projection ~ N(0, std).

    Args:
        clone: the clone.
        std: the standard deviation.
        seed: seed of a CPU generator drawing every projection in turn
            (:meth:`~lrkd.models.lowrank.LowRankClone.all_projections` order); ``None`` draws
            from the global RNG.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    for p in clone.all_projections():
        p.copy_(torch.randn(p.shape, generator=generator) * std)


@torch.no_grad()
def init_embedding_pca(clone: LowRankClone) -> None:
    """Every projection = the top-d_S right singular vectors of the teacher's embedding matrix.

    Args:
        clone: the clone.
    """
    embedding = clone.teacher.model.embed_tokens.weight.detach().float()
    basis = torch.linalg.svd(embedding, full_matrices=False).Vh[: clone.hidden_size].t()
    for p in clone.all_projections():
        p.copy_(basis)


@torch.no_grad()
def init_activation_pca(clone: LowRankClone, probe_input_ids: torch.Tensor) -> None:
    """Projections from the principal directions of the teacher's residual stream.

    U is the top-d_S eigenvectors of the second moment of the teacher's residual stream at
    every norm input on the probe (each token scaled to unit norm). The input-side projections
    are ``diag(g) U c`` (g the teacher norm's gain, c the RMS ratio of the student's norm input
    to the teacher's), the output-side ones and the embedding's ``U``; a tied projection's
    final norm gain is fitted (:func:`_tied_head_gain`).

    Args:
        clone: the clone.
        probe_input_ids: token ids [B, L] to run the teacher on (every token counts), e.g.
            from lrkd's ``data.probe.probe_batch``.
    """
    teacher = clone.teacher
    probe_input_ids = probe_input_ids.to(teacher.lm_head.weight.device)
    inputs = _residual_stream(teacher, probe_input_ids)
    d_t, d_s = teacher.config.hidden_size, clone.hidden_size
    eigvals, basis = _principal_basis(inputs.values(), d_t, d_s)

    def scale(key: str) -> float:
        return _rms_ratio(inputs[key], basis, d_s)

    def input_side(norm: nn.Module, key: str) -> torch.Tensor:
        return (_gain(norm)[:, None] * basis * scale(key)).float()

    output_side = basis.float()
    for i, layer in enumerate(teacher.model.layers):
        proj = clone.projections[i]
        p_attn = input_side(layer.input_layernorm, f"{i}.in")
        p_ffn = input_side(layer.post_attention_layernorm, f"{i}.post")
        for key in ("q", "k", "v"):
            proj[key].copy_(p_attn)
        for key in ("gate", "up"):
            proj[key].copy_(p_ffn)
        proj["o"].copy_(output_side)
        proj["down"].copy_(output_side)
    clone.embed_projection.copy_(output_side)
    if clone.head_projection is not None:
        clone.head_projection.copy_(input_side(teacher.model.norm, "final"))
    else:
        gain = _tied_head_gain(teacher, inputs["final"], basis, scale("final"))
        clone.norm.weight.copy_(gain)
    captured = eigvals.flip(-1)[:d_s].sum() / eigvals.sum()
    log.info(
        "lrkd: activation_pca init: the top %d directions hold %.1f%% of the teacher's "
        "normalised residual-stream energy on %d probe tokens",
        d_s,
        100 * captured.item(),
        probe_input_ids.numel(),
    )


def _residual_stream(teacher: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's residual stream at every norm input, in float32.

    Args:
        teacher: the teacher.
        input_ids: the probe token ids, on the teacher's device.

    Returns:
        By key, in forward order: ``"{i}.in"`` (layer i's input, at ``input_layernorm``),
        ``"{i}.post"`` (its midpoint, at ``post_attention_layernorm``) and ``"final"`` (the
        final norm's input); each [B, L, d_T].
    """
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    norms: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(teacher.model.layers):
        norms.append((f"{i}.in", layer.input_layernorm))
        norms.append((f"{i}.post", layer.post_attention_layernorm))
    norms.append(("final", teacher.model.norm))
    for key, norm in norms:
        hooks.append(
            norm.register_forward_hook(
                lambda m, a, o, key=key: inputs.__setitem__(key, a[0].detach().float())
            )
        )
    try:
        teacher(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def _principal_basis(
    states: Iterable[torch.Tensor], d_t: int, d_s: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top principal directions of residual-stream states, every token at unit norm.

    Args:
        states: residual-stream states [..., d_T] (every site weighs the same per token).
        d_t: the teacher's hidden size.
        d_s: how many directions.

    Returns:
        The eigenvalues of the (float64, CPU) second moment, ascending [d_T], and the basis U
        [d_T, d_S] (float64), top direction first.
    """
    second_moment = torch.zeros(d_t, d_t, dtype=torch.float64)
    for h in states:
        h = h.reshape(-1, d_t).float().cpu()
        h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # every layer weighs the same
        second_moment += (h.t() @ h).double()
    eigvals, eigvecs = torch.linalg.eigh(second_moment)
    return eigvals, eigvecs[:, -d_s:].flip(-1)


def _rms_ratio(h: torch.Tensor, basis: torch.Tensor, d_s: int) -> float:
    """RMS of the student's norm input (over d_S) over the teacher's (over d_T).

    Folding it into the input-side projection makes the student's norm output match the
    teacher's.

    Args:
        h: the teacher's norm input [..., d_T].
        basis: U [d_T, d_S].
        d_s: the student's hidden size.

    Returns:
        The ratio.
    """
    d_t = h.shape[-1]
    h = h.reshape(-1, d_t).float().cpu()
    rms_s = (h @ basis.float()).double().pow(2).sum(-1).mean() / d_s
    rms_t = h.double().pow(2).sum(-1).mean() / d_t
    return math.sqrt((rms_s / rms_t.clamp_min(1e-24)).item())


def _gain(norm: nn.Module) -> torch.Tensor:
    """A norm's gain, float64 on the CPU."""
    return norm.weight.detach().double().cpu()


def _tied_head_gain(
    teacher: nn.Module, h: torch.Tensor, basis: torch.Tensor, scale: float
) -> torch.Tensor:
    """The student's final-norm gain under ``activation_pca`` when one projection serves the
    embedding and the LM head (a tied teacher, or ``tie_embedding_projection``).

    One projection U serves embedding and head, so the head computes
    H_T U diag(g_S) U^T x instead of the teacher's H_T diag(g_T) x (H_T the teacher's LM head,
    x the RMS-normalised final hidden state). g_S is the least-squares fit in the logit metric
    H_T^T H_T over the probe tokens (normal equations of a d_S-dimensional linear problem).

    Args:
        teacher: the teacher.
        h: the teacher's final norm input on the probe [..., d_T].
        basis: U [d_T, d_S].
        scale: the RMS ratio of the final norm's input (:func:`_rms_ratio`).

    Returns:
        g_S [d_S], in float32.
    """
    d_t = h.shape[-1]
    x = h.reshape(-1, d_t).double().cpu()
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    second = x.t() @ x / x.shape[0]
    head = teacher.lm_head.weight.detach().double().cpu()
    metric = head.t() @ head
    g_teacher = teacher.model.norm.weight.detach().double().cpu()
    lhs = (basis.t() @ second @ basis) * (basis.t() @ metric @ basis)
    rhs = torch.diagonal(basis.t() @ metric @ (g_teacher[:, None] * second) @ basis)
    ridge = 1e-8 * torch.diagonal(lhs).mean() * torch.eye(lhs.shape[0], dtype=lhs.dtype)
    gain = torch.linalg.solve(lhs + ridge, rhs)
    return (gain * scale).float()
