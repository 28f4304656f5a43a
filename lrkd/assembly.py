"""The teacher-student pair a :class:`~lrkd.module.DistillationModule` trains: the student
built for the frozen teacher (with the probe batch its builder asks for), the checks that the
two fit together, and the special tokens read from the teacher's side."""

from __future__ import annotations

from typing import Any

from torch import nn

from lrkd.data.probe import probe_batch
from lrkd.models.protocols import ActivationCheckpointing, CoRunStudent
from lrkd.models.students import StudentBuilder
from lrkd.models.teachers import load_tokenizer

__all__ = ["build_student", "check_pair", "enable_activation_checkpointing", "token_setting"]


def build_student(
    student: nn.Module | StudentBuilder, teacher: nn.Module, tokenizer: Any
) -> nn.Module:
    """The student: ``student`` itself, or what the builder ``student`` builds for ``teacher``
    (called with the probe batch it requests, if any: :meth:`StudentBuilder.probe_request`).

    Args:
        student: a student module or a student builder.
        teacher: the frozen teacher.
        tokenizer: the teacher's tokenizer when the module loaded it, else ``None`` (then a
            requested probe is tokenised with the tokenizer of the teacher's ``name_or_path``).

    Returns:
        The student.

    Raises:
        ValueError: the builder requests a probe and no tokenizer can be found for the teacher.
    """
    if not isinstance(student, StudentBuilder):
        return student
    request = student.probe_request()
    if request is None:
        return student(teacher)
    texts, n_tokens = request
    if tokenizer is None:
        source = getattr(teacher, "name_or_path", None)
        try:
            if not source:
                raise ValueError("the teacher has no name_or_path")
            tokenizer = load_tokenizer(source, field="model.teacher")
        except (OSError, ValueError) as err:
            raise ValueError(
                f"model.student: {type(student).__name__} requests a probe batch (e.g. "
                "init: activation_pca) tokenised with the teacher's tokenizer, but none could "
                f"be loaded from the teacher's name_or_path {source!r} ({err}). Give "
                "model.teacher by name (a built-in name, model directory or hub id), or build "
                "the student in Python with probe_input_ids (LowRankClone(teacher, ..., "
                "probe_input_ids=lrkd.data.probe.probe_batch(tokenizer))), or use "
                "init: embedding_pca."
            ) from err
    return student(teacher, probe_input_ids=probe_batch(tokenizer, texts, n_tokens))


def check_pair(teacher: nn.Module, student: nn.Module, clone_weight: float) -> None:
    """Refuse a clone loss weight for a student that reports no clone loss, and a co-run
    student that runs alongside a different teacher.

    Raises:
        ValueError: naming the field and the fix.
    """
    co_run = isinstance(student, CoRunStudent)
    if clone_weight and not co_run:
        raise ValueError(
            f"model.loss.clone_weight={clone_weight}, but the student "
            f"({type(student).__name__}) has no activation clone loss; use "
            "lrkd.models.lowrank.LowRankCloneBuilder or set clone_weight: 0."
        )
    if co_run and student.teacher is not teacher:
        raise ValueError(
            "model.student runs alongside a teacher that is not model.teacher; build it with "
            "a StudentBuilder (e.g. LowRankCloneBuilder) so both share one frozen teacher."
        )


def token_setting(tokenizer: Any, teacher: nn.Module, name: str) -> Any:
    """``eos_token_id`` / ``pad_token_id`` (``name``) from the first source that names one: the
    teacher's tokenizer, its generation config, its config; ``None`` if none does."""
    sources = (
        tokenizer,
        getattr(teacher, "generation_config", None),
        getattr(teacher, "config", None),
    )
    for source in sources:
        value = getattr(source, name, None)
        if value is not None:
            return value
    return None


def enable_activation_checkpointing(student: nn.Module) -> None:
    """Recompute each of ``student``'s layers in backward (non-reentrant checkpointing).

    Raises:
        ValueError: the student offers no ``gradient_checkpointing_enable``.
    """
    if not isinstance(student, ActivationCheckpointing):
        raise ValueError(
            f"model.activation_checkpointing: the student ({type(student).__name__}) has no "
            "gradient_checkpointing_enable(); checkpoint its layers in its own forward instead."
        )
    # Non-reentrant: works with frozen inputs, FSDP2 and torch.compile.
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
