"""Teacher and student on the same batch: logits, or final hidden states and LM heads.

Two ways to run them (:func:`run_pair`):

- separately: the frozen teacher under ``torch.no_grad()`` on its own tokens (the student's, or
  its own prompt over the same responses), then the student;
- co-run: a :class:`~lrkd.models.protocols.CoRunStudent` (a Low-Rank Clone) runs teacher layer
  i and student layer i together in one pass and reports its clone losses.

And two kinds of output: logits [B, L, V], or (``hidden=True``) the final normed hidden states
and LM head weights, from which :func:`lrkd.losses.head_kd_losses` takes the divergence a few
tokens at a time without making full logits. The hidden-state path needs Hugging Face causal
LMs whose logits are ``lm_head(norm(h))`` (:func:`supports_hidden_path`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lrkd.losses import TopKTeacher
from lrkd.models.protocols import CoRunStudent
from lrkd.models.students import model_logits

__all__ = ["PairedOutput", "final_hidden", "final_norm", "run_pair", "supports_hidden_path"]


@dataclass
class PairedOutput:
    """Both models' outputs on one batch: logits, or hidden states and heads.

    Attributes:
        student_logits, teacher_logits: [B, L, V] on the logits path (the teacher's without
            grad), else ``None``.
        hidden, head, teacher_hidden, teacher_head: on the hidden-state path, the final normed
            hidden states [B, L, d] and LM head weights [V, d] of both models.
        clone_losses: per clone term, from a co-run student (empty otherwise).
        teacher_top_k: a cached teacher's top-k distribution [B, L, k] (then
            ``teacher_logits`` is ``None``: the teacher did not run).
    """

    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_head: torch.Tensor | None = None
    clone_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_top_k: TopKTeacher | None = None


def final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm of a Hugging Face causal LM whose logits are ``lm_head(norm(h))`` (no
    head bias, soft-capping or logit scale), or None."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    plain_head = isinstance(head, nn.Linear) and head.bias is None
    scaled = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    return norm if isinstance(norm, nn.Module) and plain_head and not scaled else None


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The final normed hidden states [B, L, d] of a Hugging Face causal LM, taken from its
    final norm during a forward that computes logits for no position."""
    captured: list[torch.Tensor] = []
    handle = final_norm(model).register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=none)
    finally:
        handle.remove()
    return captured[-1]


def supports_hidden_path(teacher: nn.Module, student: nn.Module) -> bool:
    """Whether :func:`run_pair` can return hidden states and heads for these models: a co-run
    student, or two Hugging Face causal LMs with a plain head (the caller checks sharding)."""
    if isinstance(student, CoRunStudent):
        return True
    return final_norm(teacher) is not None and final_norm(student) is not None


def run_pair(
    teacher: nn.Module,
    student: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    teacher_inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    hidden: bool = False,
) -> PairedOutput:
    """Run teacher (without gradients) and student on a batch.

    Args:
        teacher, student: the models (a co-run student runs the teacher itself).
        input_ids, attention_mask: the student's tokens [B, L].
        teacher_inputs: the teacher's own ``(input_ids, attention_mask)`` when it reads a
            different prompt; ``None``: the student's.
        hidden: return final hidden states and heads instead of logits.
    """
    if isinstance(student, CoRunStudent):
        if teacher_inputs is not None:
            raise ValueError(
                "A teacher prompt different from the student's (teacher_input_ids, e.g. "
                "data.teacher_prompt_template) cannot be used with a LowRankClone student: "
                "its clone loss pairs teacher and student activations on the same tokens."
            )
        out = student(input_ids, attention_mask, with_teacher=True, return_hidden=hidden)
        if hidden:
            return PairedOutput(hidden=out.hidden, head=out.head, teacher_hidden=out.teacher_hidden,
                                teacher_head=out.teacher_head,
                                clone_losses=out.clone_losses)  # fmt: skip
        return PairedOutput(out.logits, out.teacher_logits, clone_losses=out.clone_losses)
    t_ids, t_mask = teacher_inputs or (input_ids, attention_mask)
    if hidden:
        with torch.no_grad():
            t_hidden = final_hidden(teacher, t_ids, t_mask)
        s_hidden = final_hidden(student, input_ids, attention_mask)
        heads = [m.get_output_embeddings().weight for m in (student, teacher)]
        return PairedOutput(hidden=s_hidden, head=heads[0], teacher_hidden=t_hidden,
                            teacher_head=heads[1])  # fmt: skip
    with torch.no_grad():
        teacher_logits = model_logits(teacher, t_ids, t_mask)
    student_logits = model_logits(student, input_ids, attention_mask)
    return PairedOutput(student_logits, teacher_logits)
