"""What a student may offer beyond ``forward(input_ids, attention_mask) -> logits``.

Any causal LM ``nn.Module`` can be a student. A student that does more declares it by having
the members of one or more of these protocols (structural typing: inheriting from them is
optional, but makes the intent explicit, as :class:`lrkd.models.lowrank.LowRankClone` does).
lrkd asks ``isinstance(student, Protocol)`` and nothing else: no attribute probing, no
signature inspection. docs/custom-students.md shows a student that implements one.

- :class:`CoRunStudent`: runs layer by layer beside its frozen teacher in one pass and reports
  activation clone losses (``model.loss.clone_weight`` weights them).
- :class:`Materializable`: turns into a plain Hugging Face model, for export and generation.
- :class:`SelfSharding`: shards itself (and the teacher parts it runs with) under FSDP2.
- :class:`GradFlushing`: caches weights it generates for a whole optimizer step and turns
  their gradients into its parameters' gradients before the optimizer step.
- :class:`ActivationCheckpointing`: recomputes its layers in backward on request
  (transformers models have this already).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class CoRunOutput:
    """What a :class:`CoRunStudent` returns from ``forward(..., with_teacher=...)``.

    Attributes:
        logits: the student's logits [B, L, V] (None with ``return_hidden``).
        teacher_logits: the teacher's logits [B, L, V] (no grad) when run with the teacher
            (None with ``return_hidden``).
        clone_losses: per clone term, the loss summed over layers (empty without the teacher).
        hidden, head: with ``return_hidden``, the student's final normed hidden states
            [B, L, d_S] and its LM head weight [V, d_S] (in the autograd graph).
        teacher_hidden, teacher_head: the same for the teacher (no grad), when run with it.
    """

    logits: torch.Tensor | None
    teacher_logits: torch.Tensor | None = None
    clone_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    head: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_head: torch.Tensor | None = None


@runtime_checkable
class CoRunStudent(Protocol):
    """A student that runs beside its teacher in one pass.

    ``forward(input_ids, attention_mask, with_teacher=True)`` runs teacher layer i and student
    layer i together and returns a :class:`CoRunOutput` with both models' logits (or, with
    ``return_hidden=True``, final hidden states and LM head weights) and the clone losses.
    ``with_teacher=False`` runs the student alone (logits in the output).
    """

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher it runs beside (the DistillationModule's own teacher)."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        with_teacher: bool = False,
        return_hidden: bool = False,
    ) -> CoRunOutput:
        """The student's (and with ``with_teacher`` the teacher's) outputs."""
        ...

    def paired_blocks(self) -> Sequence[nn.Module]:
        """The modules whose outputs begin with (student hidden, teacher hidden) after each
        layer, in order (for per-layer diagnostics)."""
        ...


@runtime_checkable
class Materializable(Protocol):
    """A student that becomes a plain Hugging Face causal LM (export, generation)."""

    def materialize(self, dtype: torch.dtype = torch.float32, into: Any = None) -> nn.Module:
        """A plain model with the student's current weights; ``into``: a model returned by an
        earlier call, refilled in place instead of built anew."""
        ...


@runtime_checkable
class SelfSharding(Protocol):
    """A student that shards itself with FSDP2 (and the teacher parts it runs with)."""

    def fully_shard(
        self, mesh: Any = None, mp_policy: Any = None, reshard_after_forward: bool = True
    ) -> None:
        """Apply ``torch.distributed.fsdp.fully_shard`` to its units over ``mesh``."""
        ...


@runtime_checkable
class GradFlushing(Protocol):
    """A student that generates weights from its parameters and may cache them for a whole
    optimizer step (``cache_weights``); then the gradients that reach the cached weights are
    turned into its parameters' gradients by :meth:`flush_weight_grads`, which the
    DistillationModule calls before every optimizer step. With ``cache_weights`` off the
    weights are generated in the autograd graph (needed under DDP and FSDP2)."""

    cache_weights: bool

    def flush_weight_grads(self) -> None:
        """Move the accumulated gradients of cached weights onto the parameters."""
        ...


@runtime_checkable
class ActivationCheckpointing(Protocol):
    """A student that recomputes its layers in backward on request (transformers' interface)."""

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Turn activation checkpointing on."""
        ...
