"""Token ids of prompts and responses, the examples built from them and batches of examples.

An example is a dict of ``input_ids``, ``attention_mask`` and ``loss_mask`` [L]; a batch stacks
them right-padded to [B, L] (see :class:`lrkd.module.DistillationModule`).
"""

from __future__ import annotations

from typing import Any

import torch

from lrkd.models.teachers import load_tokenizer

__all__ = [
    "pad_collate",
    "prompt_response_example",
    "prompt_token_ids",
    "resolve_tokenizer",
    "response_token_ids",
    "teacher_view",
]


def resolve_tokenizer(name: str | None) -> Any:
    """The DataModule's tokenizer, loaded from ``name`` (``data.tokenizer``; ``lrkd fit`` sets it
    to ``model.teacher`` when the teacher is given by name and the config leaves it out)."""
    if name is None:
        raise ValueError(
            "data.tokenizer is not set: give the teacher's tokenizer (a built-in name, local "
            "directory or hub id). lrkd fit takes model.teacher when the teacher is given by name."
        )
    return load_tokenizer(name, field="data.tokenizer")


def prompt_token_ids(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt, as a user turn of the tokenizer's chat template (followed by the
    assistant's opening) when ``chat_template`` is set and the tokenizer has one, else as is."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def response_token_ids(tokenizer: Any, response: str) -> list[int]:
    """Token ids of a response text, closed by the EOS token (a target too)."""
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def prompt_response_example(
    prompt_ids: list[int], response_ids: list[int], seq_length: int | None = None
) -> dict[str, torch.Tensor]:
    """One example of prompt + response tokens in which only the response tokens are targets.

    Returns:
        ``input_ids``, ``attention_mask`` and ``loss_mask`` [L], truncated to ``seq_length``.
    """
    ids = torch.tensor([*prompt_ids, *response_ids][:seq_length], dtype=torch.long)
    loss_mask = torch.zeros_like(ids)
    loss_mask[len(prompt_ids) :] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}


def pad_collate(
    examples: list[dict[str, torch.Tensor]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad examples of different lengths into a batch (pad positions are masked out).
    Each sequence key ([L], or [L, ...]) is padded to its own longest (a teacher's view may be
    longer)."""
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        if examples[0][key].dim() == 0:
            batch[key] = torch.stack([e[key] for e in examples])
            continue
        length = max(e[key].shape[0] for e in examples)
        fill = pad_token_id if key.endswith("input_ids") else 0
        rest = examples[0][key].shape[1:]  # e.g. a teacher cache's top-k [L, k]
        out = torch.full((len(examples), length, *rest), fill, dtype=examples[0][key].dtype)
        for i, e in enumerate(examples):
            out[i, : e[key].shape[0]] = e[key]
        batch[key] = out
    return batch


def teacher_view(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The teacher's own ``input_ids`` / ``attention_mask`` / ``loss_mask`` of a batch whose
    teacher sees a different prompt (``teacher_*`` keys), or ``None`` when it sees the
    student's sequence."""
    if "teacher_input_ids" not in batch:
        return None
    keys = ("input_ids", "attention_mask", "loss_mask")
    return {key: batch[f"teacher_{key}"] for key in keys if f"teacher_{key}" in batch}
