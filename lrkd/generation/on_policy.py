"""On-policy batches: the student's own completions of a batch's prompts, as training rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lrkd.data.text import pad_collate, prompt_response_example

__all__ = ["batch_prompts", "completion_batch"]


def completion_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """A training batch of prompt + completion rows in which only completion tokens are targets.

    Rows are right-padded; ``max_length`` truncates each row.

    Returns:
        ``input_ids``, ``attention_mask`` and ``loss_mask`` [B, L] (the batch format of
        :class:`lrkd.module.DistillationModule`).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts and {len(completions)} completions")
    examples = [
        prompt_response_example(list(p), list(c), max_length)
        for p, c in zip(prompts, completions, strict=True)
    ]
    return pad_collate(examples, pad_token_id)


def batch_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The prompt of each row of a prompt+response training batch.

    A row's prompt is its attended tokens before its first training target (``loss_mask``),
    so right or left padding and the response itself are left out.

    Raises:
        ValueError: a row whose first attended token is already a target (packed text rather
            than prompt + response data): there is nothing to prompt the model with.
    """
    input_ids = batch["input_ids"]
    attended = batch.get("attention_mask", torch.ones_like(input_ids)).to(torch.bool)
    targets = batch["loss_mask"].to(torch.bool) & attended
    before_first_target = targets.long().cumsum(dim=-1) == 0
    keep = (attended & before_first_target).cpu()
    input_ids = input_ids.cpu()
    prompts = [input_ids[row][keep[row]].tolist() for row in range(input_ids.shape[0])]
    empty = [row for row, prompt in enumerate(prompts) if not prompt]
    if empty:
        raise ValueError(
            f"batch rows {empty} have no prompt tokens (their first token is a training target). "
            "On-policy steps sample a completion of each row's prompt, so they need "
            "prompt + response data (loss_mask 0 on the prompt), e.g. DistillDataModule or "
            "TextDataModule with prompt/response records, not packed text."
        )
    return prompts
