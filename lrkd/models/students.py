"""Students: the protocol a student follows, and builders that derive a student from the teacher.

A student is any ``nn.Module`` that maps ``input_ids`` [B, L] (and an optional ``attention_mask``)
to next-token logits [B, L, V], either as a tensor or as an object with a ``.logits`` attribute
(what every Hugging Face causal LM returns). Give it in the config by ``class_path``::

    model:
      student:
        class_path: my_pkg.MyLM
        init_args: {vocab_size: 49152, width: 256}

A student that must see the teacher to be built (a smaller copy of its architecture, or the
low-rank clone) is given as a :class:`StudentBuilder`: the DistillationModule calls it with the
loaded teacher, and with a probe batch of token ids when the builder requests one
(:meth:`StudentBuilder.probe_request`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lrkd._compat import derived_config
from lrkd.models.teachers import resolve_model_path


class StudentBuilder:
    """Builds a student from the frozen teacher. Subclass it and implement ``__call__``.

    A builder that needs to see the teacher run on some text (e.g. an activation-based
    initialisation) says so by returning a request from :meth:`probe_request`; it is then
    called as ``builder(teacher, probe_input_ids=ids)``, where ``ids`` are the requested texts
    tokenised with the teacher's tokenizer (lrkd's ``data.probe.probe_batch``). A builder
    that requests nothing (the default) is called as ``builder(teacher)``, so a
    ``__call__(self, teacher)`` is all it needs.

    A builder that reads the teacher's weights (not only its config) sets
    :attr:`uses_teacher_weights`, so that a run from a teacher cache, which never loads them,
    refuses it by name.
    """

    #: Whether the builder reads the teacher's weights or runs it (not only its ``config``).
    uses_teacher_weights: bool = False

    def probe_request(self) -> tuple[list[str] | None, int] | None:
        """The probe batch this builder needs, if any.

        Returns:
            ``None`` (the default): no probe; the builder is called as ``builder(teacher)``.
            Otherwise ``(texts, n_tokens)``: the texts to tokenise (``None``: the built-in
            corpus) and about how many tokens to keep; the builder is then called as
            ``builder(teacher, probe_input_ids=ids)`` with ids [rows, 256].
        """
        return None

    def __call__(self, teacher: nn.Module) -> nn.Module:
        """Return a new trainable student for ``teacher``."""
        raise NotImplementedError


class FromTeacherConfig(StudentBuilder):
    """A randomly initialised student of the teacher's architecture with a smaller config.

    The teacher's Hugging Face config is copied (so tokenizer ids, RoPE, norms and activation
    stay the teacher's) and the given fields are overridden. Fields left ``None`` keep the
    teacher's value, except that the head layout and FFN width follow a smaller ``hidden_size``:
    the teacher's head_dim is kept, the query/KV head ratio is kept, and the FFN width is
    scaled by the same factor as the hidden size.

    Args:
        hidden_size: student hidden size; ``None`` keeps the teacher's.
        num_hidden_layers: number of decoder layers; ``None`` keeps the teacher's.
        intermediate_size: FFN width; ``None`` scales the teacher's with ``hidden_size``.
        num_attention_heads: query heads; ``None`` is ``hidden_size // teacher_head_dim``.
        num_key_value_heads: KV heads; ``None`` keeps the teacher's query/KV ratio.
        head_dim: per-head width; ``None`` is ``hidden_size // num_attention_heads``.
        tie_word_embeddings: share embedding and LM head; ``None`` keeps the teacher's choice.
        overrides: any further config fields to set, e.g. ``{"rope_theta": 10000.0}``.
        seed: seed for the random initialisation; ``None`` uses the global RNG.
    """

    def __init__(
        self,
        hidden_size: int | None = None,
        num_hidden_layers: int | None = None,
        intermediate_size: int | None = None,
        num_attention_heads: int | None = None,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        tie_word_embeddings: bool | None = None,
        overrides: dict[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.tie_word_embeddings = tie_word_embeddings
        self.overrides = dict(overrides or {})
        self.seed = seed

    def student_config(self, teacher_config: Any) -> Any:
        """Return the student's Hugging Face config derived from ``teacher_config``."""
        config = derived_config(teacher_config)
        t_hidden = teacher_config.hidden_size
        t_heads = teacher_config.num_attention_heads
        t_kv = getattr(teacher_config, "num_key_value_heads", None) or t_heads
        t_head_dim = getattr(teacher_config, "head_dim", None) or t_hidden // t_heads

        hidden = self.hidden_size or t_hidden
        heads = self.num_attention_heads or max(1, hidden // t_head_dim)
        head_dim = self.head_dim or (t_head_dim if hidden == t_hidden else hidden // heads)
        kv = self.num_key_value_heads or max(1, heads * t_kv // t_heads)
        if heads % kv:
            raise ValueError(
                f"model.student: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv}; set both explicitly."
            )
        intermediate = self.intermediate_size or max(
            8, round(teacher_config.intermediate_size * hidden / t_hidden / 8) * 8
        )
        config.hidden_size = hidden
        config.num_attention_heads = heads
        config.num_key_value_heads = kv
        config.head_dim = head_dim
        config.intermediate_size = intermediate
        config.num_hidden_layers = self.num_hidden_layers or teacher_config.num_hidden_layers
        if hasattr(config, "layer_types") and config.layer_types is not None:
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        if self.tie_word_embeddings is not None:
            config.tie_word_embeddings = self.tie_word_embeddings
        for key, value in self.overrides.items():
            setattr(config, key, value)
        return config

    def __call__(self, teacher: nn.Module) -> nn.Module:
        """Build the student for ``teacher`` (which must carry a Hugging Face ``config``)."""
        from transformers import AutoModelForCausalLM

        teacher_config = getattr(teacher, "config", None)
        if teacher_config is None or not hasattr(teacher_config, "hidden_size"):
            raise TypeError(
                "model.student: FromTeacherConfig needs a Hugging Face teacher (with a .config); "
                f"got {type(teacher).__name__}. Give the student by class_path instead."
            )
        config = self.student_config(teacher_config)
        if self.seed is not None:
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def output_vocab_size(model: nn.Module) -> int | None:
    """The number of logits ``model`` produces per position, when it can be read off the model."""
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        weight = getattr(head, "weight", None)
        if weight is not None:
            return int(weight.shape[0])
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    return int(vocab) if vocab is not None else None


def model_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Run a causal LM and return its logits [B, L, V], whatever it returns them in."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(
            f"{type(model).__name__} must return logits [batch, length, vocab] (a tensor or an "
            f"object with .logits); got {type(out).__name__}."
        )
    return logits


class TeacherCopy(StudentBuilder):
    """A trainable copy of the teacher itself, for self-distillation.

    The student starts as the teacher (same architecture and weights, in fp32) and is trained
    while the teacher stays frozen; the two only differ through what they see (e.g. the
    teacher's privileged prompt, ``data.teacher_prompt_template``) and through training.
    The teacher is copied after it is loaded, so with ``teacher_dtype: bfloat16`` the student
    starts from the bf16-rounded weights.
    """

    uses_teacher_weights = True

    def __call__(self, teacher: nn.Module) -> nn.Module:
        """Return the copy (fp32, train mode, every parameter trainable)."""
        student = copy.deepcopy(teacher).to(torch.float32)
        return student.train().requires_grad_(True)


class Pretrained(StudentBuilder):
    """A pretrained Hugging Face causal LM as the student: the exported student of an earlier
    ``lrkd fit`` (to go on from it with other data or another loss), or a smaller model that
    shares the teacher's tokenizer.

    The model is loaded in fp32, in train mode, every parameter trainable. Its vocabulary must
    cover the teacher's tokenizer: a student with fewer output rows than the teacher's tokenizer
    has tokens is refused by name.

    Args:
        path: a local Hugging Face model directory (e.g. ``runs/my_run/student``), a built-in
            name or a hub id.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, teacher: nn.Module) -> nn.Module:
        """Load the student and check its vocabulary against the teacher's."""
        from transformers import AutoModelForCausalLM

        source = resolve_model_path(self.path, field="model.student.path")
        student = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        teacher_config = getattr(teacher, "config", None)
        ours, theirs = output_vocab_size(student), getattr(teacher_config, "vocab_size", None)
        if ours is not None and theirs is not None and ours < theirs:
            raise ValueError(
                f"model.student.path={self.path!r} has {ours} output tokens, fewer than "
                f"the teacher's {theirs}: give a student that shares the teacher's "
                "tokenizer."
            )
        return student.train().requires_grad_(True)
