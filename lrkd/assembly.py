"""The teacher-student pair a :class:`~lrkd.module.DistillationModule` trains: the student
built for the frozen teacher (with the probe batch its builder asks for), the checks that the
two fit together, and the special tokens read from the teacher's side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lrkd.data.probe import probe_batch
from lrkd.data.teacher_cache import TEACHER_DIR, TeacherCacheInfo, read_teacher_cache
from lrkd.models.protocols import ActivationCheckpointing, CoRunStudent
from lrkd.models.students import StudentBuilder
from lrkd.models.teachers import CachedTeacher, load_tokenizer

__all__ = [
    "build_student",
    "cached_teacher",
    "check_pair",
    "enable_activation_checkpointing",
    "token_setting",
]


def _same_teacher(given: str, cached: str) -> bool:
    """Whether two teacher references name the same model (names equal, or the same path)."""
    if given == cached:
        return True
    a, b = Path(given).expanduser(), Path(cached).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def cached_teacher(
    teacher: str | nn.Module | None, cache: str, temperature: float
) -> tuple[CachedTeacher, Any, TeacherCacheInfo]:
    """The stand-in teacher, tokenizer and description of the teacher cache at ``cache``,
    after checking that it is the cache of the configured teacher and temperature.

    Args:
        teacher: ``model.teacher``: ``None`` (take the cache's), or a name that must be the
            cache's teacher.
        cache: ``model.teacher_cache``.
        temperature: ``model.loss.temperature``, which must be the cache's.

    Raises:
        ValueError: a teacher or temperature other than the cache's, or a teacher module.
    """
    info = read_teacher_cache(cache)
    if isinstance(teacher, nn.Module):
        raise ValueError(
            "model.teacher is a module, but model.teacher_cache is set: a run from a teacher "
            "cache never loads the teacher; give model.teacher by name or leave it out."
        )
    if teacher is not None and not _same_teacher(teacher, info.teacher):
        raise ValueError(
            f"model.teacher={teacher!r}, but model.teacher_cache={cache!r} holds the log-probs "
            f"of {info.teacher!r}; set model.teacher: {info.teacher} (or leave it out), or cache "
            f"this teacher: lrkd cache-teacher --teacher {teacher} --prepared PREPARED --out DIR"
        )
    if temperature != info.temperature:
        raise ValueError(
            f"model.loss.temperature={temperature}, but model.teacher_cache={cache!r} holds "
            f"log-probs at temperature {info.temperature} (a top-k cache cannot be re-tempered: "
            f"its tail's shape is unknown); set model.loss.temperature: {info.temperature}, or "
            f"cache again with --temperature {temperature}"
        )
    directory = Path(cache).expanduser() / TEACHER_DIR
    tokenizer = load_tokenizer(str(directory), field="model.teacher_cache")
    return CachedTeacher(directory, info.teacher), tokenizer, info


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
    if isinstance(teacher, CachedTeacher) and student.uses_teacher_weights:
        raise ValueError(
            f"model.student: {type(student).__name__} reads the teacher's weights, but with "
            "model.teacher_cache the teacher is never loaded; use a student built from the "
            "teacher's config (lrkd.models.students.FromTeacherConfig) or by class_path, or "
            "distil online (leave model.teacher_cache out)."
        )
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
    if co_run and isinstance(teacher, CachedTeacher):
        raise ValueError(
            "model.student runs alongside the teacher (a Low-Rank Clone: its weights are made "
            "from the teacher's and its clone loss needs the teacher's activations), but with "
            "model.teacher_cache the teacher is never loaded; distil it online (leave "
            "model.teacher_cache out)."
        )
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
