"""The rank advisor: which student width (the rank d_S of a Low-Rank Clone) a token budget
supports, against how much of the teacher's hidden-state variance each width leaves out.

Two sides of the choice, from the theory of low-rank distillation:

* **Estimation.** The generalisation error grows as O(r (m + n) / sqrt(n)) in the rank r with
  n training samples, so the optimal rank is r* = O(sqrt(n)). :func:`suggested_rank` returns
  ``c * sqrt(n)``; the theory gives only the order, ``c`` is a convention (:data:`DEFAULT_C`).
* **Capacity.** A width-r student cannot represent the share
  ``sum_{i > r} s_i^2 / sum_i s_i^2`` of the variance of the teacher's hidden states (s their
  singular values on a probe set): :func:`spectral_tail`, per decoder layer.

:func:`rank_report` puts both in one table; ``lrkd rank`` prints it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrkd.data.probe import probe_batch
from lrkd.diagnostics.representation import layer_outputs
from lrkd.models.teachers import load_tokenizer

DEFAULT_C: float = 0.01
"""The constant in r* = c * sqrt(n) (n in training tokens). The theory gives only the order
sqrt(n), no constant: 0.01 is a calibration convention, not a derived value. It maps about 2e10
training tokens (the order of the budgets the LRC paper trains its ~1.5B students on) to
r* ≈ 1414, near the 1536-wide LRC-1.5B student. Override it (``--c``) with your own
calibration."""


def suggested_rank(num_tokens: float, c: float = DEFAULT_C) -> float:
    """The rank the token budget supports: r* = c * sqrt(n).

    Args:
        num_tokens: n, the number of training tokens.
        c: the constant (see :data:`DEFAULT_C`).

    Returns:
        r*, unrounded.

    Raises:
        ValueError: if ``num_tokens`` or ``c`` is not positive.
    """
    if not num_tokens > 0:
        raise ValueError(f"num_tokens={num_tokens!r}: the token budget must be positive.")
    if not c > 0:
        raise ValueError(f"c={c!r}: the constant in r* = c * sqrt(n) must be positive.")
    return c * math.sqrt(num_tokens)


def round_to_heads(width: float, num_heads: int, max_width: int) -> int:
    """The multiple of ``num_heads`` nearest to ``width``, clamped to [num_heads, max_width].

    A Low-Rank Clone's hidden size must be a multiple of the teacher's attention heads and at
    most the teacher's hidden size. Halves round up.

    Args:
        width: the width to round, e.g. :func:`suggested_rank`.
        num_heads: the teacher's number of attention heads.
        max_width: the largest allowed width (the teacher's hidden size); rounded down to a
            multiple of ``num_heads`` if it is not one.

    Returns:
        The rounded width.

    Raises:
        ValueError: if ``num_heads < 1`` or ``max_width < num_heads``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r}: must be at least 1.")
    if max_width < num_heads:
        raise ValueError(f"max_width={max_width!r} is below num_heads={num_heads}.")
    nearest = math.floor(width / num_heads + 0.5) * num_heads
    return int(min(max(nearest, num_heads), max_width // num_heads * num_heads))


def spectral_tail(hidden: torch.Tensor, ranks: Sequence[int], center: bool = True) -> torch.Tensor:
    """Share of the variance of ``hidden`` outside its top-r singular directions, per r.

    With s the singular values of the [N, d] matrix (in float64), the tail at r is
    ``sum_{i > r} s_i^2 / sum_i s_i^2``: the relative squared error of the best rank-r
    approximation. It is 1 at r = 0, non-increasing, and 0 from the matrix rank on
    (exactly 0 for r >= min(N, d)). An all-zero matrix has tail 0 everywhere.

    Args:
        hidden: [..., d] activations; leading dims are flattened into N rows.
        ranks: the ranks r (non-negative).
        center: subtract each column's mean first (variance about the mean rather than the
            raw second moment).

    Returns:
        float64 tensor [len(ranks)].

    Raises:
        ValueError: if a rank is negative.
    """
    if any(r < 0 for r in ranks):
        raise ValueError(f"ranks={list(ranks)}: ranks must be non-negative.")
    x = hidden.detach().reshape(-1, hidden.shape[-1]).to(torch.float64)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    energy = torch.linalg.svdvals(x).pow(2)
    total = energy.sum()
    if total <= 0:
        return torch.zeros(len(ranks), dtype=torch.float64)
    # suffix[i] = sum_{j >= i} s_j^2 (0-based), so the tail at r is suffix[r] / total.
    suffix = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    index = torch.tensor([min(int(r), energy.numel()) for r in ranks], dtype=torch.long)
    return (suffix[index] / total).clamp(0.0, 1.0).cpu()


def teacher_hidden_states(
    teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The output of every decoder layer of a Hugging Face decoder, at the real tokens.

    Forward hooks on ``teacher.model.layers``; the LM head is not run. The last layer's output
    is taken before the final norm (transformers' ``output_hidden_states`` gives it after).

    Args:
        teacher: a causal LM with ``teacher.model.layers`` (Llama, Mistral, Qwen2/3, ...).
        input_ids: [B, L] token ids.
        attention_mask: [B, L], 1 at real tokens; ``None`` takes every token.

    Returns:
        One float32 CPU tensor [n_real_tokens, d] per decoder layer, in layer order.
    """
    device = next(teacher.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    keep = None if attention_mask is None else attention_mask.bool()
    with layer_outputs(teacher.model.layers) as outputs, torch.no_grad():
        teacher.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return [
        (h.reshape(-1, h.shape[-1]) if keep is None else h[keep]).float().cpu() for h in outputs
    ]


@dataclass
class RankRow:
    """One width of a :class:`RankReport`.

    Args:
        width: the student width (rank) r.
        tail_mean: the spectral tail at r, mean over the teacher's decoder layers.
        tail_final: the spectral tail at r of the last decoder layer's output.
        tail_max: the largest spectral tail at r over the layers.
        tokens_for_width: (r / c)^2, the token budget for which r* = c * sqrt(n) equals r.
    """

    width: int
    tail_mean: float
    tail_final: float
    tail_max: float
    tokens_for_width: float


@dataclass
class RankReport:
    """The rank advisor's result: the suggested rank and the teacher's spectral tails.

    Args:
        num_tokens: n, the training token budget.
        c: the constant in r* = c * sqrt(n).
        suggested: r* = c * sqrt(n), unrounded.
        suggested_width: r* rounded to a multiple of the heads in [num_heads, teacher_width].
        teacher_width: the teacher's hidden size d_T.
        num_heads: the teacher's number of attention heads.
        probe_tokens: the number of probe tokens the tails were measured on.
        rows: one :class:`RankRow` per width, by increasing width.
    """

    num_tokens: float
    c: float
    suggested: float
    suggested_width: int
    teacher_width: int
    num_heads: int
    probe_tokens: int
    rows: list[RankRow]

    def table(self) -> str:
        """The report as text: a header with r* and a markdown table, one line per width.

        Returns:
            The text (no trailing newline).
        """
        header = [
            f"r* = c*sqrt(n) = {self.c:g} * sqrt({self.num_tokens:.3g}) = {self.suggested:.1f}, "
            f"rounded to {self.suggested_width} (a multiple of the teacher's {self.num_heads} "
            f"heads, at most its width {self.teacher_width}).",
            f"Spectral tail: the share of the variance of the teacher's hidden states "
            f"({self.probe_tokens} probe tokens) outside their top-`width` singular directions, "
            "per decoder layer: mean, last layer, max. tokens for width: (width / c)^2, the n "
            "whose r* is this width.",
            "",
            "| width | tail mean | tail final | tail max | tokens for width |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines = []
        for row in self.rows:
            mark = " (r*)" if row.width == self.suggested_width else ""
            lines.append(
                f"| {row.width}{mark} | {row.tail_mean:.4f} | {row.tail_final:.4f} "
                f"| {row.tail_max:.4f} | {row.tokens_for_width:.2e} |"
            )
        return "\n".join(header + lines)


def default_widths(teacher_width: int, num_heads: int) -> list[int]:
    """Multiples of the heads at about 1/8, 1/4, 3/8, 1/2, 3/4 and 1 of the teacher width.

    Args:
        teacher_width: the teacher's hidden size d_T.
        num_heads: the teacher's number of attention heads.

    Returns:
        The widths, deduplicated and sorted.
    """
    fractions = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1)
    return sorted({round_to_heads(f * teacher_width, num_heads, teacher_width) for f in fractions})


def rank_report(
    teacher: nn.Module,
    num_tokens: float,
    c: float = DEFAULT_C,
    widths: Sequence[int] | None = None,
    probe_input_ids: torch.Tensor | None = None,
    probe_tokens: int = 4096,
) -> RankReport:
    """Suggest a student width for a token budget and measure what each width leaves out.

    Args:
        teacher: a Hugging Face causal LM with ``config.hidden_size``,
            ``config.num_attention_heads`` and ``model.layers``.
        num_tokens: n, the number of training tokens.
        c: the constant in r* = c * sqrt(n) (see :data:`DEFAULT_C`).
        widths: the widths to tabulate, each in [1, d_T]; ``None`` takes
            :func:`default_widths`. The suggested width is always added.
        probe_input_ids: [B, L] probe token ids (every token counts); ``None`` tokenises the
            built-in corpus with the teacher's tokenizer (:func:`lrkd.data.probe.probe_batch`),
            loaded from the teacher's ``name_or_path``.
        probe_tokens: about how many built-in probe tokens to use when ``probe_input_ids`` is
            ``None`` (packed in rows of 256).

    Returns:
        The :class:`RankReport`.

    Raises:
        ValueError: if ``num_tokens`` or ``c`` is not positive, a width is outside [1, d_T], or
            no ``probe_input_ids`` are given and the teacher's tokenizer cannot be loaded.
    """
    d_t = int(teacher.config.hidden_size)
    heads = int(teacher.config.num_attention_heads)
    suggested = suggested_rank(num_tokens, c)
    suggested_width = round_to_heads(suggested, heads, d_t)
    if widths is None:
        widths = default_widths(d_t, heads)
    bad = [w for w in widths if not 1 <= w <= d_t]
    if bad:
        raise ValueError(
            f"widths={list(widths)}: {bad} outside [1, {d_t}] (the teacher's hidden size)."
        )
    widths = sorted({int(w) for w in widths} | {suggested_width})
    if probe_input_ids is None:
        probe_input_ids = probe_batch(_teacher_tokenizer(teacher), n_tokens=probe_tokens)
    layers = teacher_hidden_states(teacher, probe_input_ids)
    tails = torch.stack([spectral_tail(h, widths) for h in layers])  # [layers, widths]
    rows = [
        RankRow(
            width=w,
            tail_mean=tails[:, j].mean().item(),
            tail_final=tails[-1, j].item(),
            tail_max=tails[:, j].max().item(),
            tokens_for_width=(w / c) ** 2,
        )
        for j, w in enumerate(widths)
    ]
    return RankReport(
        num_tokens=float(num_tokens),
        c=float(c),
        suggested=suggested,
        suggested_width=suggested_width,
        teacher_width=d_t,
        num_heads=heads,
        probe_tokens=int(layers[0].shape[0]),
        rows=rows,
    )


def _teacher_tokenizer(teacher: nn.Module) -> Any:
    """The tokenizer of the teacher's ``name_or_path`` (for the built-in probe).

    Raises:
        ValueError: the teacher has no ``name_or_path`` or its tokenizer cannot be loaded.
    """
    source = getattr(teacher, "name_or_path", None) or getattr(
        getattr(teacher, "config", None), "name_or_path", None
    )
    try:
        if not source:
            raise ValueError("the teacher has no name_or_path")
        return load_tokenizer(source, field="teacher")
    except (OSError, ValueError) as err:
        raise ValueError(
            "rank_report: the probe needs the teacher's tokenizer, but none could be loaded "
            f"from the teacher's name_or_path {source!r} ({err}). Give probe_input_ids (e.g. "
            "lrkd.data.probe.probe_batch(tokenizer, n_tokens=4096))."
        ) from err
