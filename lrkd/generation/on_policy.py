"""On-policy batches: the student's own completions of a batch's prompts, as training rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lrkd.data.sampling_settings import check_sampling
from lrkd.data.tokens import pad_collate, prompt_response_example, teacher_view
from lrkd.generation.sampling import generate, generation_model
from lrkd.seeds import row_seed

__all__ = [
    "OnPolicy",
    "OnPolicySampler",
    "batch_prompts",
    "check_on_policy_fraction",
    "completion_batch",
    "response_stats",
]


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


def check_on_policy_fraction(fraction: float) -> None:
    """Raise unless ``fraction`` is a share in [0, 1]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"model.on_policy.fraction={fraction}; it is a share in [0, 1].")


def response_stats(
    batch: dict[str, torch.Tensor], eos_ids: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Mean target tokens per row, and the share of rows whose targets do not end with EOS (cut
    at the length limit), of a batch trained on (data or the student's rollouts)."""
    targets = batch["loss_mask"].to(torch.bool)
    if "attention_mask" in batch:
        targets &= batch["attention_mask"].to(torch.bool)
    positions = torch.arange(targets.shape[1], device=targets.device)
    last = torch.where(targets, positions, -1).amax(dim=-1)
    last_token = batch["input_ids"].gather(1, last.clamp_min(0)[:, None]).squeeze(1)
    eos = torch.tensor(list(eos_ids), device=last_token.device)
    ended = torch.isin(last_token, eos) & (last >= 0)
    return {
        "train/response_tokens": targets.sum(dim=-1).float().mean(),
        "train/response_truncated": (~ended).float().mean(),
    }


@dataclass(frozen=True)
class OnPolicy:
    """The on-policy settings (``model.on_policy``): how often the student's own completions
    replace the data's responses, and how they are sampled.

    Attributes:
        fraction: share of training batches on which the student's own completions replace
            the data's responses (GKD's lambda): 0 never (plain distillation), 1 always. Which
            batches are on-policy is a fixed function of ``seed`` and the step, the same on
            every rank and after resuming.
        max_new_tokens: the longest completion the student samples on an on-policy step.
        temperature: sampling temperature of those completions (0 is greedy). 1 samples from
            the student's own distribution, which is what on-policy reverse KL assumes.
        top_p: nucleus sampling threshold of those completions (1 disables it).
        seed: seed of the on-policy sampling and of the choice of on-policy batches.
        eos_token_id: the token id(s) that end a sampled completion; ``None`` takes the
            teacher tokenizer's EOS, else the teacher's generation config's or config's.
    """

    fraction: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: int | list[int] | None = None


class OnPolicySampler:
    """Which training batches are on-policy, and the student's completions that replace their
    responses (GKD, Agarwal et al. 2024).

    The student samples one completion per prompt (the tokens before each row's first target)
    without gradients; the batch becomes prompt + completion with only the completion tokens
    (and the EOS the student wrote) as targets. A teacher view (``teacher_*`` keys) gets the same
    completions after its own prompt. The batch's ``weight`` and ``problem_index`` are kept.

    Args:
        settings: the settings (:class:`OnPolicy`); a ``fraction`` in between 0 and 1 draws
            on-policy batches by a function of ``seed``, the step and the batch index only.
        pad_token_id: the padding id (``None``: the first EOS id).

    Without an EOS id (``settings.eos_token_id`` or :meth:`set_tokens`), on-policy steps fail
    with a message naming ``model.on_policy.eos_token_id``.
    """

    def __init__(self, settings: OnPolicy = OnPolicy(), pad_token_id: int | None = None) -> None:
        check_on_policy_fraction(settings.fraction)
        check_sampling(settings.max_new_tokens, settings.temperature, settings.top_p,
                       "model.on_policy.")  # fmt: skip
        self.fraction = settings.fraction
        self.ever_enabled = settings.fraction > 0
        self.refused: str | None = None
        self.max_new_tokens = settings.max_new_tokens
        self.temperature = settings.temperature
        self.top_p = settings.top_p
        self.seed = settings.seed
        self._eos: list[int] | None = None
        self._pad = pad_token_id
        self._rollout_model: nn.Module | None = None
        self.set_tokens(settings.eos_token_id, None)

    def set_tokens(
        self, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None
    ) -> None:
        """Set the id(s) that end a completion and the padding id (``None``: unknown)."""
        if eos_token_id is not None:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            self._eos = [int(i) for i in ids]
        if pad_token_id is not None:
            self._pad = int(pad_token_id)

    def refuse(self, reason: str) -> None:
        """Refuse on-policy steps from now on (e.g. no teacher to score them), for ``reason``."""
        self.refused = reason
        self.check_fraction(self.fraction)

    def check_fraction(self, fraction: float) -> None:
        """Raise unless ``fraction`` is a share in [0, 1] that this sampler may take."""
        check_on_policy_fraction(fraction)
        if fraction > 0 and self.refused is not None:
            raise ValueError(f"an on-policy fraction of {fraction}: {self.refused}")

    def set_fraction(self, fraction: float) -> None:
        """Set the share of on-policy training batches from the next batch on."""
        self.check_fraction(fraction)
        self.fraction = fraction
        self.ever_enabled |= fraction > 0

    @property
    def rollout_model(self) -> nn.Module | None:
        """The plain model that the last on-policy step sampled from, when the student had to
        be materialised or gathered for it (refilled in place on the next step)."""
        return self._rollout_model

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids that end a completion."""
        if self._eos is None:
            raise ValueError(
                "On-policy steps need an end-of-sequence token: set "
                "model.on_policy.eos_token_id (no tokenizer or teacher config names one)."
            )
        return self._eos

    @property
    def pad_token_id(self) -> int:
        """The padding id of completion batches."""
        return self.eos_token_ids[0] if self._pad is None else self._pad

    def is_on_policy(self, step: int, batch_idx: int) -> bool:
        """Whether training batch ``batch_idx`` of optimizer step ``step`` is on-policy."""
        if self.fraction <= 0.0:
            return False
        if self.fraction >= 1.0:
            return True
        draw = row_seed(self.seed, f"on_policy@{step}", batch_idx) / 2.0**63
        return draw < self.fraction

    def batch(
        self,
        student: nn.Module,
        batch: dict[str, torch.Tensor],
        step: int,
        batch_idx: int = 0,
        rank: int = 0,
        device: torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        """The batch with its responses replaced by ``student``'s completions, on ``device``
        (``None``: the batch's)."""
        prompts = batch_prompts(batch)
        eos_ids, pad = self.eos_token_ids, self.pad_token_id
        if "problem_index" in batch:
            keys: list[str | int] = batch["problem_index"].tolist()
        else:
            keys = [f"{rank}.{row}" for row in range(len(prompts))]
        model = generation_model(student, reuse=self._rollout_model)
        if model is not student:
            self._rollout_model = model  # a plain copy, refilled in place on later steps
        rollouts = generate(
            model, prompts, num_samples=1, max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, eos_token_id=eos_ids,
            pad_token_id=pad, batch_size=len(prompts),
            seed=row_seed(self.seed, f"rollout@{step}", batch_idx), keys=keys,
        )  # fmt: skip
        completions = [per_prompt[0] for per_prompt in rollouts.completion_ids]
        out = completion_batch(prompts, completions, pad)
        view = teacher_view(batch)
        if view is not None:  # the teacher scores the same completions after its own prompt
            teacher_out = completion_batch(batch_prompts(view), completions, pad)
            out.update({f"teacher_{key}": value for key, value in teacher_out.items()})
        for key in ("weight", "problem_index"):
            if key in batch:
                out[key] = batch[key]
        device = batch["input_ids"].device if device is None else device
        return {key: value.to(device) for key, value in out.items()}
