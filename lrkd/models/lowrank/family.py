"""Which teachers a Low-Rank Clone supports, and the Hugging Face config of a clone."""

from __future__ import annotations

from typing import Any

from torch import nn

from lrkd._compat import derived_config

__all__ = ["SUPPORTED_FAMILIES", "check_hidden_size", "check_teacher", "student_config_for"]

SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
"""``config.model_type`` values LowRankClone supports (Llama covers SmolLM2 and Llama-3.x)."""


def check_teacher(teacher: nn.Module) -> Any:
    """Check that ``teacher`` is a causal LM of a supported family.

    Args:
        teacher: the would-be teacher.

    Returns:
        The teacher's Hugging Face config.

    Raises:
        ValueError: the family is not supported, or the model lacks ``.model.layers`` or
            ``.lm_head``.
    """
    config = getattr(teacher, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        got = f"model_type={model_type!r}" if model_type else f"a {type(teacher).__name__}"
        raise ValueError(
            f"LowRankClone supports teachers of the families {', '.join(SUPPORTED_FAMILIES)} "
            f"(transformers config.model_type); got {got}. Use a plain student "
            "(lrkd.models.students.FromTeacherConfig or your own class_path) for this teacher."
        )
    base = getattr(teacher, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(teacher, "lm_head"):
        raise ValueError(
            f"LowRankClone needs a transformers *ForCausalLM teacher with .model.layers and "
            f".lm_head; got {type(teacher).__name__}."
        )
    return config


def check_hidden_size(hidden_size: int, teacher_config: Any) -> None:
    """Check that a clone of width ``hidden_size`` can be made of the teacher.

    Args:
        hidden_size: the student's hidden size d_S.
        teacher_config: the teacher's Hugging Face config.

    Raises:
        ValueError: ``hidden_size`` is not in [1, d_T] or not a multiple of the teacher's
            number of attention heads (the message names the nearest valid widths).
    """
    d_teacher = teacher_config.hidden_size
    if not 0 < hidden_size <= d_teacher:
        raise ValueError(
            f"LowRankClone: hidden_size={hidden_size} must be between 1 and the teacher's "
            f"hidden size {d_teacher} (the clone projects the teacher's hidden side down)."
        )
    heads = teacher_config.num_attention_heads
    if hidden_size % heads:
        lower, upper = hidden_size // heads * heads, (hidden_size // heads + 1) * heads
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"LowRankClone: hidden_size={hidden_size} must be a multiple of the teacher's "
            f"{heads} attention heads (transformers' config validation refuses to save or "
            f"load the exported model otherwise); nearest: {nearest}."
        )


def student_config_for(
    teacher_config: Any,
    hidden_size: int,
    norm_eps: float | None = None,
    tied: bool | None = None,
) -> Any:
    """The Hugging Face config of a clone.

    Args:
        teacher_config: the teacher's Hugging Face config.
        hidden_size: the student's hidden size d_S.
        norm_eps: the student's ``rms_norm_eps``; ``None`` keeps the teacher's.
        tied: whether the student ties its embedding and LM head; ``None`` keeps the teacher's
            ``tie_word_embeddings``.

    Returns:
        The teacher's config with ``hidden_size`` and an explicit ``head_dim`` (attention keeps
        the teacher's heads and head width).
    """
    config = derived_config(teacher_config)
    head_dim = getattr(teacher_config, "head_dim", None) or (
        teacher_config.hidden_size // teacher_config.num_attention_heads
    )
    config.head_dim = head_dim
    config.hidden_size = hidden_size
    config.use_cache = True
    if norm_eps is not None:
        config.rms_norm_eps = norm_eps
    if tied is not None:
        config.tie_word_embeddings = tied
    return config
