"""The distillation objective: (teacher output, student output, batch) -> loss terms.

For a batch whose ``loss_mask`` selects the target tokens (position i predicts token i + 1),

    loss = kd_weight * sum_b w_b * sum_t D_bt / N  +  ce_weight * CE  +  clone_weight * C

where N is the number of target tokens (``kd_reduction: token_mean``) or of rows
(``batchmean``, the official Low-Rank Clone code's ``kl_div(..., reduction="batchmean")``,
which also counts each row's last position), D is the divergence between the teacher's and the
student's next-token distributions at a temperature (:class:`lrkd.losses.KDDivergence`, fp32,
chunked over tokens), w_b the example's ``weight`` (1 without one), CE the student's next-token
cross-entropy and C the sum of the clone losses a :class:`~lrkd.models.protocols.CoRunStudent`
reports. Weights with mean 1 keep the scale of unweighted distillation.

When the teacher reads its own prompt over the same responses (``teacher_*`` batch keys, e.g.
``data.teacher_prompt_template``), :func:`aligned_targets` pairs the k-th target position of each
row in both sequences; the two must predict the same tokens.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from lrkd.data.tokens import teacher_view
from lrkd.losses import (
    DIVERGENCE_KINDS,
    KDDivergence,
    TopKTeacher,
    chunked_cross_entropy,
    head_kd_losses,
)
from lrkd.models.paired_forward import PairedOutput
from lrkd.models.students import output_vocab_size

log = logging.getLogger("lrkd")

__all__ = [
    "KD_REDUCTIONS",
    "DistillationObjective",
    "Loss",
    "Targets",
    "aligned_targets",
    "next_token_targets",
    "shared_vocab_size",
]


KD_REDUCTIONS: tuple[str, ...] = ("token_mean", "batchmean")
"""How the divergence is normalised: over target tokens, or over rows (every position counted)."""


def next_token_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token targets [B, L] of a batch and the mask [B, L] of the positions whose
    prediction counts (the batch's ``loss_mask`` and ``attention_mask``, shifted by one).

    Position i predicts token i + 1. Shifting the targets and the mask (rather than slicing the
    logits) keeps the logits contiguous: a sliced [B, L-1, V] view would cost a second
    full-size gradient buffer in backward. The last position is never a target.
    """
    input_ids = batch["input_ids"]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, :-1] = batch["loss_mask"][:, 1:].to(torch.bool)
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        mask[:, :-1] &= attention_mask[:, 1:].to(torch.bool)
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    return targets, mask


def aligned_targets(
    targets: torch.Tensor, mask: torch.Tensor, t_targets: torch.Tensor, t_mask: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The (row, position) indices of the student's and the teacher's target positions, in the
    same order, after checking that each row predicts the same tokens in both sequences."""
    if mask.shape[0] != t_mask.shape[0]:
        raise ValueError(
            f"teacher_input_ids has {t_mask.shape[0]} rows, input_ids {mask.shape[0]}."
        )
    rows, t_rows = mask.nonzero(as_tuple=True), t_mask.nonzero(as_tuple=True)
    same = torch.equal(mask.sum(dim=1), t_mask.sum(dim=1)) and torch.equal(
        targets[rows], t_targets[t_rows]
    )
    if not same:
        raise ValueError(
            "The teacher's sequence (teacher_input_ids, teacher_loss_mask) must contain the "
            "same response tokens as the student's, after its own prompt: the targets differ."
        )
    return rows, t_rows


def _scatter(
    values: torch.Tensor, rows: tuple[torch.Tensor, ...], like: torch.Tensor
) -> torch.Tensor:
    """``values`` of the selected positions ``rows`` placed in a zero tensor shaped ``like``."""
    out = values.new_zeros(like.shape)
    out[rows] = values
    return out


@dataclass
class Targets:
    """The targets of one batch, for both models.

    Attributes:
        targets, mask: the student's next-token targets and target mask [B, L].
        teacher_targets, teacher_mask: the teacher's (its own sequence's, or the same tensors).
        rows, teacher_rows: with a teacher prompt of its own, the paired target positions
            (:func:`aligned_targets`); ``None`` when both read the same sequence.
        last: [B] whether each row's last position holds a real token in the loss (its
            prediction has no next-token target in the row, but ``batchmean`` counts it).
    """

    targets: torch.Tensor
    mask: torch.Tensor
    teacher_targets: torch.Tensor
    teacher_mask: torch.Tensor
    rows: tuple[torch.Tensor, ...] | None = None
    teacher_rows: tuple[torch.Tensor, ...] | None = None
    last: torch.Tensor | None = None

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> Targets:
        """The targets of ``batch`` (and of its teacher view, paired, when it has one)."""
        targets, mask = next_token_targets(batch)
        last = batch["loss_mask"][:, -1].to(torch.bool)
        if batch.get("attention_mask") is not None:
            last = last & batch["attention_mask"][:, -1].to(torch.bool)
        view = teacher_view(batch)
        if view is None:
            return cls(targets, mask, targets, mask, last=last)
        t_targets, t_mask = next_token_targets(view)
        rows, t_rows = aligned_targets(targets, mask, t_targets, t_mask)
        return cls(targets, mask, t_targets, t_mask, rows, t_rows, last)

    def with_last_positions(self) -> torch.Tensor:
        """The target mask plus each row's last position where :attr:`last` holds: every
        position of a packed row."""
        mask = self.mask.clone()
        if self.last is not None:
            mask[:, -1] = self.last
        return mask


def shared_vocab_size(
    teacher: nn.Module, student: nn.Module, vocab_size: int | None, tokenizer_size: int | None
) -> int | None:
    """The number of logits the loss keeps when teacher and student heads differ only by padding
    rows (``None``: keep all, they are equal or unknown).

    Raises:
        ValueError: a real vocabulary mismatch (more real tokens than the smaller head).
    """
    v_teacher = output_vocab_size(teacher)
    v_student = output_vocab_size(student)
    if v_teacher is None or v_student is None or v_teacher == v_student:
        return None
    n_tokens = vocab_size or tokenizer_size
    if n_tokens is not None and n_tokens <= min(v_teacher, v_student):
        log.warning(
            "lrkd: teacher has %d logits, student %d; the tokenizer has %d tokens, so the "
            "extra rows are padding and the loss uses the shared first %d.",
            v_teacher,
            v_student,
            n_tokens,
            min(v_teacher, v_student),
        )
        return min(v_teacher, v_student)
    known = f"the tokenizer has {n_tokens} tokens" if n_tokens else "no tokenizer size known"
    raise ValueError(
        f"Vocab mismatch: the teacher predicts {v_teacher} tokens and the student "
        f"{v_student} ({known}). The student must use the teacher's tokenizer: set "
        f"model.student's vocab_size to {v_teacher}. If the two differ only by padded "
        "embedding rows, set model.loss.vocab_size to the real number of tokens."
    )


@dataclass(frozen=True)
class Loss:
    """The loss settings (``model.loss``): which divergence, at which temperature, and the
    weights of the three terms.

    Attributes:
        divergence: the divergence between teacher and student token distributions:
            ``forward_kl`` (KL(teacher||student)), ``reverse_kl`` (KL(student||teacher)),
            ``jsd`` (generalised, see ``jsd_beta``), ``skew_forward_kl``, ``skew_reverse_kl``
            (see ``skew_alpha``) or ``tvd``.
        temperature: both models' logits are divided by it before the divergence.
        scale_by_temperature_squared: multiply the divergence by T^2 (Hinton et al.), which
            keeps gradient magnitudes comparable across temperatures.
        kd_reduction: ``token_mean`` (default): the divergence summed over target tokens over
            their number. ``batchmean``: summed over every position that holds a real token in
            the loss (each row's last one too, which has no next-token target in the row) over
            the number of rows, as the official Low-Rank Clone code's
            ``kl_div(..., reduction="batchmean")`` on packed rows. It is then about
            ``seq_length`` times larger; weigh it with ``kd_weight``. Not with a teacher cache
            or a teacher prompt of its own.
        kd_weight: weight of the divergence term.
        ce_weight: weight of the student's next-token cross-entropy on the data (0 disables).
        clone_weight: weight alpha of the activation clone loss, for a student that runs
            alongside the teacher and reports one (``lrkd.models.lowrank.LowRankClone``); its
            terms are chosen on the student (``clone_terms``). 0 disables it.
        jsd_beta: mixture weight of the teacher in ``jsd``; 0 is forward KL, 1 reverse KL.
        skew_alpha: skew of the ``skew_*`` divergences.
        chunk_size: tokens per chunk in the loss; ``None`` picks about 64 MB per fp32 chunk.
        vocab_size: the number of real tokens; when teacher and student heads differ in size
            only by padding rows, the logits are cut to the shared size. ``None`` uses the
            teacher tokenizer's length when the teacher is loaded by name.
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    scale_by_temperature_squared: bool = False
    kd_reduction: str = "token_mean"
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    clone_weight: float = 0.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    chunk_size: int | None = None
    vocab_size: int | None = None


class DistillationObjective(nn.Module):
    """The loss terms of a batch from both models' outputs (see the module docstring).

    Args:
        loss: the settings (:class:`Loss`); ``loss.vocab_size`` is used by the module to
            work out ``shared_vocab``.
        shared_vocab: keep only the first ``shared_vocab`` logits (padded heads).
    """

    def __init__(self, loss: Loss = Loss(), shared_vocab: int | None = None) -> None:
        super().__init__()
        if loss.divergence not in DIVERGENCE_KINDS:
            raise ValueError(
                f"model.loss.divergence={loss.divergence!r} is not a known divergence; "
                f"choose one of {', '.join(DIVERGENCE_KINDS)}."
            )
        try:
            self.divergence = KDDivergence(
                loss.divergence,  # type: ignore[arg-type]
                loss.temperature,
                beta=loss.jsd_beta,
                skew_alpha=loss.skew_alpha,
                chunk_size=loss.chunk_size,
            )
        except ValueError as err:
            raise ValueError(
                f"model.loss: {err} (see model.loss.temperature, jsd_beta, skew_alpha)."
            ) from err
        if loss.kd_reduction not in KD_REDUCTIONS:
            raise ValueError(
                f"model.loss.kd_reduction={loss.kd_reduction!r}; choose one of "
                f"{', '.join(KD_REDUCTIONS)}."
            )
        weights = {"kd_weight": loss.kd_weight, "ce_weight": loss.ce_weight,
                   "clone_weight": loss.clone_weight}  # fmt: skip
        negative = [f"{name}={value}" for name, value in weights.items() if value < 0]
        if negative:
            raise ValueError(
                f"model.loss.{', '.join(negative)}: a negative weight would maximise its term; "
                "loss weights must be >= 0."
            )
        if not any(weights.values()):
            raise ValueError(
                "model.loss: kd_weight, ce_weight and clone_weight are all 0, so nothing would be "
                "trained; set kd_weight (e.g. 1.0)."
            )
        self.default_temperature = loss.temperature
        self.scale_by_temperature_squared = loss.scale_by_temperature_squared
        self.kd_reduction = loss.kd_reduction
        self.kd_weight = loss.kd_weight
        self.ce_weight = loss.ce_weight
        self.clone_weight = loss.clone_weight
        self.shared_vocab = shared_vocab
        #: The only temperature allowed (a teacher cache's), with the reason; ``None``: any.
        self.fixed_temperature: tuple[float, str] | None = None

    def check_temperature(self, temperature: float | None) -> None:
        """Refuse a divergence temperature other than :attr:`fixed_temperature` (``None``
        stands for the configured one).

        Raises:
            ValueError: naming both temperatures and why only one is allowed.
        """
        temperature = self.default_temperature if temperature is None else temperature
        if self.fixed_temperature is not None and temperature != self.fixed_temperature[0]:
            fixed, why = self.fixed_temperature
            raise ValueError(f"divergence temperature {temperature}: {why} holds log-probabilities "
                             f"at temperature {fixed} only")  # fmt: skip

    def set_divergence(self, kind: str, temperature: float | None = None) -> None:
        """Use divergence ``kind`` from the next batch on, at ``temperature`` (``None``: the
        configured ``temperature``); the other divergence settings are kept."""
        self.check_temperature(temperature)
        old = self.divergence
        self.divergence = KDDivergence(
            kind,  # type: ignore[arg-type]
            self.default_temperature if temperature is None else temperature,
            beta=old.beta,
            skew_alpha=old.skew_alpha,
            chunk_size=old.chunk_size,
        )

    def vocab_aligned(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' logits cut to the shared vocabulary (padded heads)."""
        if self.shared_vocab is not None:
            student_logits = student_logits[..., : self.shared_vocab]
            teacher_logits = teacher_logits[..., : self.shared_vocab]
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(
                f"Vocab mismatch at run time: teacher logits have {teacher_logits.shape[-1]} "
                f"entries, student logits {student_logits.shape[-1]}. Set model.loss.vocab_size to "
                "the real number of tokens if the difference is padding."
            )
        return student_logits, teacher_logits

    def token_losses(
        self, out: PairedOutput, t: Targets, kd_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token divergence [B, L] over ``kd_mask`` (``None``: the target mask), the mean
        CE over the target mask, and the teacher's logits (``None`` on the hidden-state path),
        from either kind of :class:`PairedOutput`."""
        d = self.divergence
        kd_mask = t.mask if kd_mask is None else kd_mask
        if kd_mask is not t.mask and (t.rows is not None or out.teacher_top_k is not None):
            raise ValueError(
                "model.loss.kd_reduction=batchmean counts each row's last position, which "
                + ("a teacher cache does not hold" if t.rows is None else
                   "cannot be paired with a teacher prompt of its own")
                + "; use kd_reduction: token_mean."
            )  # fmt: skip
        if out.student_logits is None:  # hidden states and heads: logits never made in full
            head, t_head = out.head, out.teacher_head
            if self.shared_vocab is not None:
                head, t_head = head[: self.shared_vocab], t_head[: self.shared_vocab]
            fused = functools.partial(
                head_kd_losses, kind=d.kind, temperature=d.temperature, beta=d.beta,
                skew_alpha=d.skew_alpha, chunk_size=d.chunk_size,
            )  # fmt: skip
            if t.rows is None:
                kd_tokens, ce_tokens = fused(
                    out.hidden, head, out.teacher_hidden, t_head, t.targets, kd_mask
                )
                if kd_mask is not t.mask:  # no CE (nor its gradient) at positions without target
                    ce_tokens = ce_tokens * t.mask
            else:
                kd_sel, ce_sel = fused(out.hidden[t.rows], head, out.teacher_hidden[t.teacher_rows],
                                       t_head, t.targets[t.rows], None)  # fmt: skip
                kd_tokens = _scatter(kd_sel, t.rows, t.mask)
                ce_tokens = _scatter(ce_sel, t.rows, t.mask)
            return kd_tokens, ce_tokens.sum() / t.mask.sum().clamp_min(1), None
        if out.teacher_top_k is not None:
            return self._top_k_losses(out.student_logits, out.teacher_top_k, t)
        student_logits, teacher_logits = self.vocab_aligned(out.student_logits, out.teacher_logits)
        if t.rows is None:
            kd_tokens = d(student_logits, teacher_logits, kd_mask)
        else:
            kd_sel = d(student_logits[t.rows], teacher_logits[t.teacher_rows])
            kd_tokens = _scatter(kd_sel, t.rows, t.mask)
        # Logged always, differentiated only when it is in the loss: the chunked losses take
        # their gradients in the forward pass, so a weight-0 CE would cost one for nothing.
        ce_logits = student_logits if self.ce_weight else student_logits.detach()
        ce = chunked_cross_entropy(
            ce_logits, t.targets, t.mask, chunk_size=d.chunk_size, reduction="mean"
        )
        return kd_tokens, ce, teacher_logits

    def _top_k_losses(
        self, student_logits: torch.Tensor, top: TopKTeacher, t: Targets
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Per-token divergence against a cached teacher's top-k and the mean CE."""
        if t.rows is not None:
            raise ValueError(
                "A teacher cache holds the teacher's distribution on the student's own tokens; "
                "a teacher prompt of its own (teacher_input_ids) cannot be used with it."
            )
        if self.shared_vocab is not None:
            student_logits = student_logits[..., : self.shared_vocab]
        kd_tokens = self.divergence.top_k(student_logits, *top, t.mask)
        ce_logits = student_logits if self.ce_weight else student_logits.detach()
        ce = chunked_cross_entropy(
            ce_logits, t.targets, t.mask, chunk_size=self.divergence.chunk_size, reduction="mean"
        )
        return kd_tokens, ce, None

    def forward(
        self,
        out: PairedOutput,
        t: Targets,
        weight: torch.Tensor | None = None,
        teacher_reference: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The loss terms.

        Args:
            out: both models' outputs on the batch.
            t: the batch's targets (:meth:`Targets.of`).
            weight: per-example weights [B] (PACED), or ``None``.
            teacher_reference: also compute the teacher's own CE (``ce_teacher``, evaluation).

        Returns:
            ``loss`` (to minimise), ``kd`` (the divergence term, before ``kd_weight``), ``ce``,
            ``clone`` and ``clone_<term>`` for a co-run student, ``ce_teacher`` when asked.
        """
        batchmean = self.kd_reduction == "batchmean"
        kd_mask = t.with_last_positions() if batchmean else t.mask
        kd_tokens, ce, teacher_logits = self.token_losses(out, t, kd_mask)
        kd_per_example = kd_tokens.sum(dim=-1)
        if weight is not None:
            kd_per_example = kd_per_example * weight.to(kd_per_example.dtype)
        kd = kd_per_example.sum() / (t.mask.shape[0] if batchmean else t.mask.sum().clamp_min(1))
        if self.scale_by_temperature_squared:
            kd = kd * self.divergence.temperature**2

        loss = self.kd_weight * kd + (self.ce_weight * ce if self.ce_weight else 0.0)
        terms = {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}
        if out.clone_losses:
            clone = torch.stack(list(out.clone_losses.values())).sum()
            if self.clone_weight:
                terms["loss"] = loss + self.clone_weight * clone
            terms["clone"] = clone.detach()
            terms.update({f"clone_{k}": v.detach() for k, v in out.clone_losses.items()})
        if teacher_reference and teacher_logits is not None:
            with torch.no_grad():
                terms["ce_teacher"] = chunked_cross_entropy(
                    teacher_logits, t.teacher_targets, t.teacher_mask,
                    chunk_size=self.divergence.chunk_size, reduction="mean",
                )  # fmt: skip
        return terms
