"""Pass-rate counts: K sampled answers per problem, checked by a verifier, split over ranks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lrkd.data.verifiers import Verifier
from lrkd.generation.sampling import generate

__all__ = ["count_correct"]


def count_correct(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[str],
    keys: Sequence[str],
    verifier: Verifier,
    tokenizer: Any,
    *,
    num_samples: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    progress: bool | str = False,
    stop: Sequence[str | int] | None = None,
) -> Tensor:
    """Sample ``num_samples`` answers per problem and count those the verifier accepts.

    With several processes, rank r takes problems r, r + world_size, ...; the per-rank counts
    are summed with ``reduce_sum`` (an all-reduce), so every rank returns the counts of all
    problems. A problem's samples depend only on ``(seed, key, sample index)``
    (:func:`lrkd.generation.sampling.generate`), not on the number of ranks.

    Args:
        model: the model to sample from (a low-rank clone materialised first).
        prompts: token ids of each formatted prompt.
        answers: each problem's reference answer.
        keys: each problem's stable id.
        verifier: decides whether a decoded sample answers its problem.
        tokenizer: decodes samples; its EOS token ends them.
        num_samples: samples per problem (K).
        temperature: sampling temperature (0 is greedy, where K > 1 repeats one answer).
        top_p: nucleus sampling mass.
        max_new_tokens: the longest answer.
        batch_size: sequences per forward pass.
        seed: base seed of the samples.
        rank: this process's rank.
        world_size: the number of processes.
        reduce_sum: sums a tensor over processes; required when ``world_size > 1``.
        progress: show a progress bar (a string labels it).
        stop: stop strings or token ids: each answer ends at the first and is verified without
            it (:class:`lrkd.data.stops.StopSequences`).

    Returns:
        The number of accepted samples of every problem [N] (int64, on the CPU).
    """
    if not len(prompts) == len(answers) == len(keys):
        raise ValueError(f"got {len(prompts)} prompts, {len(answers)} answers and {len(keys)} keys")
    if world_size > 1 and reduce_sum is None:
        raise ValueError("reduce_sum is required with world_size > 1")
    mine = list(range(rank, len(prompts), world_size))
    rollouts = generate(
        model,
        [prompts[i] for i in mine],
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        seed=seed,
        keys=[keys[i] for i in mine],
        tokenizer=tokenizer,
        progress=progress,
        stop=stop,
    )
    assert rollouts.texts is not None
    correct = torch.zeros(len(prompts), dtype=torch.int64)
    for i, texts in zip(mine, rollouts.texts, strict=True):
        correct[i] = sum(bool(verifier(text, answers[i])) for text in texts)
    if world_size > 1:
        assert reduce_sum is not None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        correct = reduce_sum(correct.to(device)).to("cpu", torch.int64)
    return correct
