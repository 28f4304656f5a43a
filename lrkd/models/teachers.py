"""Load a teacher (a built-in name, a local Hugging Face dir, or a hub name) and freeze it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrkd.hardware import auto_teacher_dtype
from lrkd.models import zoo

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(name_or_path: str, field: str = "model.teacher") -> str:
    """Turn a teacher reference into something ``from_pretrained`` accepts.

    Args:
        name_or_path: a built-in name (see ``lrkd.models.zoo.BUILTIN_MODELS``), a local Hugging
            Face model directory, or a Hugging Face Hub id such as ``org/model``.
        field: the config field being resolved, named in error messages.

    Returns:
        A local directory path (built-in or local) or the hub id unchanged.

    Raises:
        FileNotFoundError: the reference looks like a path but nothing is there.
    """
    if zoo.is_builtin(name_or_path):
        return str(zoo.builtin_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{field}={name_or_path!r} is a directory without config.json; give a Hugging "
                "Face model directory (config.json + weights)."
            )
        return str(path)
    if _HUB_ID.match(name_or_path) and not path.exists():
        return name_or_path
    raise FileNotFoundError(
        f"{field}={name_or_path!r}: no such model directory. Give a local Hugging Face model "
        f"directory, a hub id like 'org/model', or a built-in name: "
        f"{', '.join(sorted(zoo.BUILTIN_MODELS))}."
    )


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and stop gradients to all of its parameters."""
    model.eval()
    model.requires_grad_(False)
    return model


def exclude_from_state_dict(module: nn.Module, children: tuple[str, ...]) -> None:
    """Leave ``module``'s named children (frozen teacher modules, reloaded from the teacher's
    source) out of its ``state_dict``, and do not expect them when loading one."""
    pattern = re.compile(rf"(^|\.)({'|'.join(map(re.escape, children))})\.")

    def drop(module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
        own = tuple(f"{prefix}{child}." for child in children)
        for key in [k for k in state_dict if k.startswith(own)]:
            del state_dict[key]

    def ignore_missing(module: nn.Module, incompatible: Any) -> None:
        missing = incompatible.missing_keys
        missing[:] = [k for k in missing if not pattern.search(k)]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(ignore_missing)


def load_teacher(
    name_or_path: str, dtype: torch.dtype | None = None, field: str = "model.teacher"
) -> nn.Module:
    """Load a Hugging Face causal LM as a frozen teacher.

    Args:
        name_or_path: built-in name, local directory or hub id (see :func:`resolve_model_path`).
        dtype: parameter dtype; ``None`` keeps float32.
        field: the config field, named in error messages.

    Returns:
        The model, in eval mode with ``requires_grad=False`` everywhere.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(name_or_path, field)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(
            f"{field}={name_or_path!r} could not be loaded: {err}\nIf this is a hub id, the "
            "machine needs network access to the Hugging Face Hub (or a populated HF cache)."
        ) from err
    return freeze(model)


def load_tokenizer(name_or_path: str, field: str = "tokenizer") -> Any:
    """Load the tokenizer that belongs to a built-in name, local directory or hub id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path, field))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class CachedTeacher(nn.Module):
    """Stands in for a teacher whose distribution comes from a teacher cache: its Hugging Face
    config (read from the cache's ``teacher/`` directory), no weights, and no forward.

    Students built from the teacher's config (``FromTeacherConfig``) and the vocabulary checks
    read :attr:`config`; anything that would run the teacher gets an error naming the cache.

    Args:
        directory: the cache's ``teacher/`` directory (``config.json``, tokenizer files).
        name: the teacher the cache was made by, for messages.
    """

    def __init__(self, directory: str | Path, name: str) -> None:
        from transformers import AutoConfig, GenerationConfig

        super().__init__()
        self.directory = Path(directory)
        self.name = name
        self.name_or_path = str(self.directory)
        self.config = AutoConfig.from_pretrained(self.directory)
        try:
            self.generation_config = GenerationConfig.from_pretrained(self.directory)
        except OSError:  # the teacher had none
            self.generation_config = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse: the teacher's weights were never loaded."""
        raise RuntimeError(
            f"the teacher ({self.name}) is not loaded: its distribution comes from the teacher "
            f"cache at {self.directory.parent}; something tried to run it"
        )


TEACHER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}  # fmt: skip


def check_teacher_dtype(name: str) -> None:
    """Raise unless ``name`` is ``auto`` or one of :data:`TEACHER_DTYPES`."""
    if name not in (*TEACHER_DTYPES, "auto"):
        raise ValueError(f"model.teacher_dtype={name!r}; choose auto, {', '.join(TEACHER_DTYPES)}.")


def frozen_teacher(teacher: str | nn.Module, dtype: str = "auto") -> tuple[nn.Module, Any]:
    """The frozen teacher in ``dtype`` and its tokenizer (``None`` for a module given as is).

    Args:
        teacher: a built-in name, local directory or hub id, or a causal LM ``nn.Module``.
        dtype: ``float32``, ``bfloat16``, ``float16``, or ``auto`` (bfloat16 where the hardware
            runs it fast: a GPU that supports it, or a CPU whose measured bf16 matmul is
            clearly faster than fp32, :mod:`lrkd.hardware`; else float32); a module keeps its
            dtype under ``auto``.
    """
    check_teacher_dtype(dtype)
    tokenizer: Any = None
    if isinstance(teacher, str):
        torch_dtype = auto_teacher_dtype() if dtype == "auto" else TEACHER_DTYPES[dtype]
        tokenizer = load_tokenizer(teacher, field="model.teacher")
        teacher = load_teacher(teacher, dtype=torch_dtype)
    elif dtype in TEACHER_DTYPES:
        teacher = teacher.to(TEACHER_DTYPES[dtype])
    return freeze(teacher), tokenizer
