"""DistillDataModule: verifiable problems, weighted by the student's pass rate (PACED).

What it does, in order:

1. **Problems**: reads JSONL problem sets (:func:`lrkd.data.problems.read_problems`) or
   generates the built-in arithmetic set; holds out a validation split.
2. **Teacher data**: each training example is a formatted prompt followed by a teacher
   response; only the response tokens are targets. Responses come from the dataset's
   ``response`` field or are generated once by the teacher (greedy by default) and cached on
   disk, keyed by the teacher's weights, the prompts and the generation settings.
3. **Pass rates**: before training (and then every N epochs or steps) the current student
   samples K answers per training problem (:mod:`lrkd.generation.sampling`), a verifier checks them,
   and ``p = correct / K``. Problems are bucketed by p and weighted by
   ``w(p) = p**alpha * (1 - p)**beta`` (:mod:`lrkd.data.pacing`, which also documents the
   normalisation and the cold-start rule). With several processes, the problems are split over
   the ranks and the counts summed, so every rank holds the same p.
4. **Batches**: examples are drawn by a sampler that follows the current weights
   (``apply_weights: sampling``) or skips zero-weight problems, and carry a per-example
   ``weight`` that the :class:`~lrkd.module.DistillationModule` multiplies into each example's
   divergence (``apply_weights: loss_weight``).
5. **Validation**: the usual divergence on held-out problems with teacher responses, plus the
   student's greedy pass@1 (``val/pass@1``) and its mean pass rate over sampled answers
   (``val/pass_rate``); the teacher's greedy pass@1 is logged once as ``val/pass@1_teacher``.

The DataModule holds data only. The model work (generating teacher responses, estimating pass
rates, evaluating pass@1) is done by :class:`lrkd.callbacks.pacing.PassRatePacing`, which takes
the models from the LightningModule and hands the results over (:meth:`set_responses`,
:meth:`set_pass_rates`); ``lrkd fit`` adds it, and a Python script puts it in the Trainer's
callbacks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from lrkd.data.checks import check_at_least, check_choice, check_fraction
from lrkd.data.overlong import OVERLONG_MODES, fit_row, keep_rows, warn_long_rows
from lrkd.data.paced_settings import Pacing, Rollouts, TeacherResponses, Validation
from lrkd.data.pacing import (
    APPLY_MODES,
    COLD_STARTS,
    WEIGHTINGS,
    check_bucket_edges,
    pacing_weights,
)
from lrkd.data.problems import (
    DIFFICULTIES,
    KINDS,
    Problem,
    builtin_problems,
    excluded_prompts,
    read_problems,
    split_problems,
)
from lrkd.data.resumable import ResumableSampler
from lrkd.data.sampling_settings import check_sampling
from lrkd.data.stops import StopSequences
from lrkd.data.tokens import (
    pad_collate,
    prompt_response_example,
    prompt_token_ids,
    resolve_tokenizer,
    response_token_ids,
)
from lrkd.data.verifiers import Verifier, get_verifier

log = logging.getLogger("lrkd")

__all__ = ["DistillDataModule", "PacedSampler"]

_RESPONSE_SOURCES = ("auto", "dataset", "generate")


class _Examples(Dataset):
    """Prompt + response examples (:func:`~lrkd.data.tokens.prompt_response_example`) that also
    carry their problem's index, for the per-example weight, and with ``teacher_prompts`` the
    teacher's view of the same response (``teacher_*`` keys). ``overlong``: ``truncate_left``
    cuts a row longer than ``seq_length`` at the start of its prompt (the teacher's prompt is
    never cut)."""

    def __init__(
        self, prompts: Sequence[list[int]], responses: Sequence[list[int]], seq_length: int,
        teacher_prompts: Sequence[list[int]] | None = None, overlong: str = "error",
    ) -> None:  # fmt: skip
        self.examples = []
        for i, row in enumerate(zip(prompts, responses, strict=True)):
            prompt, response = fit_row(*row, seq_length, overlong)
            example = prompt_response_example(prompt, response, seq_length)
            example["problem_index"] = torch.tensor(i)
            if teacher_prompts is not None:
                # The response as the student sees it (cut to seq_length), after the teacher's
                # prompt: both score exactly the same response tokens.
                kept = response[: max(0, len(example["input_ids"]) - len(prompt))]
                teacher = prompt_response_example(teacher_prompts[i], kept)
                example.update({f"teacher_{k}": v for k, v in teacher.items()})
            self.examples.append(example)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]


class PacedSampler(ResumableSampler):
    """Draws training examples by the DataModule's current pass-rate weights.

    ``sampling`` mode draws ``num_samples`` problems with probability proportional to w (with
    replacement), reading the weights again for every batch, so a re-estimation takes effect
    at once. ``loss_weight`` mode walks through random permutations of the problems it keeps
    (those with w > 0 when zero-weight problems are skipped, else all). An epoch is always
    ``num_samples`` examples, however many problems have weight. Under DDP, Lightning wraps the
    sampler and draws an epoch's indices at its start (same seed on every rank). A run resumed
    mid-epoch continues at the same data position (see :class:`ResumableSampler`), even where
    the weights changed since the epoch began.
    """

    def next_chunk(self, produced: int, generator: torch.Generator) -> torch.Tensor:
        """The next batch of draws (``sampling``) or the next permutation (``loss_weight``)."""
        dm = self.datamodule
        if dm.pacing.apply_weights == "sampling":
            size = min(dm.batch_size, self.num_samples - produced)
            return torch.multinomial(dm.sampling_probabilities(), size, replacement=True,
                                     generator=generator)  # fmt: skip
        support = dm.support()
        order = torch.randperm(len(support), generator=generator)
        return support[order][: self.num_samples - produced]


class DistillDataModule(LightningDataModule):
    """Verifiable problems with teacher responses, weighted by the student's pass rate (PACED).

    See the module documentation for the data flow, and :mod:`lrkd.data.pacing` for the weight,
    its normalisation and the cold-start rule.

    Args:
        train_files: JSONL problem files (``{"prompt", "answer"}``, optional ``id`` and
            ``response``). ``None`` uses the built-in arithmetic generator.
        val_files: held-out problem files; ``None`` holds out ``val_fraction`` of the training
            problems.
        num_problems: size of the built-in problem set (before ``exclude``).
        problem_kinds: kinds of built-in problems: ``add``, ``sub``, ``mul``, ``word``.
        difficulties: difficulty levels of built-in problems (1 easiest .. 5).
        val_fraction: share of the problems held out when ``val_files`` is None.
        exclude: problem sets kept out of training and validation (decontamination): any
            problem whose prompt is also in one of them is dropped, and the count is logged.
            JSONL problem files, or the built-in evaluation sets by name (``lrkd_arithmetic``,
            ``lrkd_word``: the items ``lrkd eval`` scores), so that a later evaluation is on
            held-out items.
        tokenizer: the teacher's tokenizer: a built-in name, local directory or hub id (``lrkd
            fit`` fills in ``model.teacher`` when it is a name and this is left out).
        chat_template: format each prompt as a user turn of the tokenizer's chat template
            (when it has one).
        prompt_template: the prompt text, with ``{prompt}`` replaced by the problem's prompt,
            e.g. ``"Question: {prompt}\\nAnswer:"``.
        teacher_prompt_template: a different prompt for the teacher over the same response
            tokens (privileged context, e.g. for self-distillation): ``{prompt}`` is replaced
            by the problem's prompt and ``{answer}`` by its reference answer, e.g. worked
            examples followed by ``"Question: {prompt}\\nAnswer:"``, or ``"Question:
            {prompt}\\n(The answer is {answer}.)\\nAnswer:"``. The teacher writes its
            generated responses after this prompt and scores every response after it; the
            student sees ``prompt_template``. Batches then carry ``teacher_input_ids``,
            ``teacher_attention_mask`` and ``teacher_loss_mask``. ``None``: the teacher sees
            the student's prompt. Special tokens written in it (``<|im_end|>`` ending each
            worked example) become their ids. Shown only the answer, a small model tends to
            answer with it bare, a format the student cannot copy (docs/benchmarks.md).
        verifier: checks an answer: a name (``final_number``, ``exact_match``, ``boxed``) or any
            :class:`~lrkd.data.verifiers.Verifier` by ``class_path``.
        teacher_responses: where the training responses come from and how the teacher writes
            them (:class:`~lrkd.data.paced_settings.TeacherResponses`: ``source``,
            ``max_new_tokens``, ``temperature``, ``drop_incorrect``, ``cache_dir``).
        rollouts: the student's samples for a pass-rate estimate
            (:class:`~lrkd.data.paced_settings.Rollouts`: ``num_samples`` (K),
            ``temperature``, ``top_p``, ``max_new_tokens``, ``batch_size``).
        pacing: how pass rates become weights and when they are estimated
            (:class:`~lrkd.data.paced_settings.Pacing`: ``weighting``, ``alpha``, ``beta``,
            ``apply_weights``, ``skip_zero_weight``, ``cold_start``, ``min_frontier``,
            ``bucket_edges``, ``estimate_at_start``, ``estimate_every_n_epochs``,
            ``estimate_every_n_steps``); see :mod:`lrkd.data.pacing` for the weight, its
            normalisation and the cold-start rule.
        validation: pass rates on the held-out problems
            (:class:`~lrkd.data.paced_settings.Validation`: ``num_samples``, ``max_problems``).
        samples_per_epoch: training examples per epoch; ``None`` is the number of training
            problems.
        seq_length: the student's prompt + response rows are truncated to this many tokens (a
            row cut at its response's end is counted in a warning; the teacher's view with
            ``teacher_prompt_template`` is the same response after the teacher's whole prompt).
        batch_size: examples per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the built-in problems, the split, the sampler and the rollouts.
        overlong: what to do with a problem whose formatted prompt alone has ``seq_length``
            tokens or more, so that no response token would be trained on (checked in
            ``setup``, before the teacher writes responses): ``error`` (refuse the data, naming
            the count and the ``seq_length`` that fits), ``drop`` (leave those problems out of
            training and validation, with a warning giving the count), ``truncate_left``
            (every row longer than ``seq_length`` loses the start of the student's prompt
            instead of the end of its response, with a warning giving the count; pass rates
            are still estimated on the whole prompt) or ``keep`` (keep them as cut, with no
            target, with a warning: what earlier versions did silently).
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        num_problems: int = 1000,
        problem_kinds: list[str] = list(KINDS),  # noqa: B006 - jsonargparse needs a literal
        difficulties: list[int] = list(DIFFICULTIES),  # noqa: B006
        val_fraction: float = 0.1,
        exclude: list[str] | None = None,
        tokenizer: str | None = None,
        chat_template: bool = True,
        prompt_template: str = "{prompt}",
        teacher_prompt_template: str | None = None,
        verifier: Verifier | str = "final_number",
        teacher_responses: TeacherResponses = TeacherResponses(),
        rollouts: Rollouts = Rollouts(),
        pacing: Pacing = Pacing(),
        validation: Validation = Validation(),
        samples_per_epoch: int | None = None,
        seq_length: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        overlong: str = "error",
    ) -> None:
        super().__init__()
        _check_settings(
            prompt_template, teacher_prompt_template, teacher_responses, rollouts, pacing,
            validation, val_fraction=val_fraction, overlong=overlong,
            problem_kinds=problem_kinds, difficulties=difficulties,
            num_problems=(num_problems, 1), batch_size=(batch_size, 1),
            seq_length=(seq_length, 2), num_workers=(num_workers, 0),
            samples_per_epoch=(samples_per_epoch, 1),
        )  # fmt: skip
        self.bucket_edges = check_bucket_edges(pacing.bucket_edges, "data.pacing.bucket_edges")
        self.teacher_responses, self.rollouts = teacher_responses, rollouts
        self.pacing, self.validation = pacing, validation
        self.verifier = get_verifier(verifier, "data.verifier")
        self.overlong = overlong
        self.train_files, self.val_files = train_files, val_files
        self.num_problems, self.problem_kinds = num_problems, list(problem_kinds)
        self.difficulties, self.val_fraction = list(difficulties), val_fraction
        self.exclude = list(exclude or [])
        self._excluded = excluded_prompts(self.exclude)  # a bad entry fails before any model
        self.tokenizer_name, self.chat_template = tokenizer, chat_template
        self.prompt_template = prompt_template
        self.teacher_prompt_template = teacher_prompt_template
        self.samples_per_epoch = samples_per_epoch
        self.seq_length, self.batch_size = seq_length, batch_size
        self.num_workers, self.seed = num_workers, seed

        self.tokenizer: Any = None
        self.train_problems: list[Problem] = []
        self.val_problems: list[Problem] = []
        self._prompts: dict[str, list[list[int]]] = {}
        self._teacher_prompts: dict[str, list[list[int]]] = {}
        self._responses: dict[str, list[list[int] | None]] = {}
        self._examples: dict[str, Dataset] = {}
        # The pacing state (saved in checkpoints): counts of the last estimate and the weights.
        self.correct: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None  # raw w per training problem (float64)
        self._derived: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.cold_started = False
        self.rounds = 0
        self.last_estimate: dict[str, int | None] = {"step": None, "epoch": None}
        self._restored: dict[str, Any] | None = None
        self._sampler: PacedSampler | None = None

    # ----------------------------------------------------------------------------- problems

    def setup(self, stage: str | None = None) -> None:
        """Read or generate the problems, split them, tokenise the prompts and take the
        dataset's own responses (once)."""
        if self.train_problems:
            return
        if self.tokenizer is None:  # a tokenizer object may be set before setup
            self.tokenizer = resolve_tokenizer(self.tokenizer_name)
        if self.train_files:
            problems = [p for f in self.train_files for p in read_problems(f)]
        else:
            problems = builtin_problems(
                self.num_problems, self.seed, self.problem_kinds, self.difficulties
            )
        val_given = [p for f in self.val_files or [] for p in read_problems(f)]
        if self.exclude:
            problems, val_given = self._decontaminated(problems), self._decontaminated(val_given)
        if self.val_files:
            train, val = problems, val_given
        else:
            train, val = split_problems(problems, self.val_fraction, self.seed)
        _check_unique_ids(train + val)
        self.train_problems, self.val_problems = train, val
        self._prompts = {"train": [self.prompt_ids(p) for p in train],
                         "val": [self.prompt_ids(p) for p in val]}  # fmt: skip
        if self.teacher_prompt_template is not None:
            self._teacher_prompts = {
                split: [self.teacher_prompt_ids(p) for p in problems]
                for split, problems in (("train", train), ("val", val))
            }
        for split, problems in (("train", train), ("val", val)):
            self._responses[split] = self._dataset_responses(split, problems)
        self._leave_out_overlong()

    def _decontaminated(self, problems: list[Problem]) -> list[Problem]:
        """``problems`` without those whose prompt is in a set of ``exclude``."""
        kept = [p for p in problems if p.prompt.strip() not in self._excluded]
        if not kept and problems:
            raise ValueError(f"data.exclude leaves none of the {len(problems)} problems; give "
                             "more problems or other sets to exclude")  # fmt: skip
        if len(kept) < len(problems):
            log.info("data.exclude: left out %d of %d problems that %s also hold",
                     len(problems) - len(kept), len(problems), ", ".join(self.exclude))  # fmt: skip
        return kept

    def _leave_out_overlong(self) -> None:
        """Refuse or drop (``overlong``) the problems whose student prompt leaves no room for a
        response token within ``seq_length``, before any response is generated (the teacher's
        prompt is not cut to ``seq_length``, so it cannot leave a row without a target)."""
        splits = ("train", "val")
        pairs = {split: list(zip(self._prompts[split], self._responses[split], strict=True))
                 for split in splits}  # fmt: skip
        totals = None
        if all(r is not None for rows in pairs.values() for _, r in rows):  # responses known
            totals = {split: [len(p) + len(r) for p, r in rows] for split, rows in pairs.items()}
        keep = keep_rows(
            {split: [len(p) for p in self._prompts[split]] for split in splits},
            {split: [f"problem id {p.id!r}" for p in self.problems(split)] for split in splits},
            self.seq_length, self.overlong, "problems", totals,
        )  # fmt: skip
        for split in splits:
            if len(keep[split]) == len(self._prompts[split]):
                continue
            indices = keep[split]
            self._prompts[split] = [self._prompts[split][i] for i in indices]
            self._responses[split] = [self._responses[split][i] for i in indices]
            if self._teacher_prompts:
                self._teacher_prompts[split] = [self._teacher_prompts[split][i] for i in indices]
            problems = [self.problems(split)[i] for i in indices]
            if split == "train":
                self.train_problems = problems
            else:
                self.val_problems = problems

    def problems(self, split: str) -> list[Problem]:
        """The problems of ``split`` (``train`` or ``val``)."""
        return self.train_problems if split == "train" else self.val_problems

    def prompts(self, split: str) -> list[list[int]]:
        """The student's prompt token ids of every problem of ``split``."""
        return self._prompts[split]

    def teacher_prompts(self, split: str) -> list[list[int]]:
        """The teacher's prompt token ids of every problem of ``split`` (its own template's, or
        the student's prompts)."""
        return self._teacher_prompts.get(split) or self._prompts[split]

    def prompt_ids(self, problem: Problem) -> list[int]:
        """Token ids of a problem's prompt as the models see it (template, chat format)."""
        text = self.prompt_template.format(prompt=problem.prompt)
        return prompt_token_ids(self.tokenizer, text, self.chat_template)

    def teacher_prompt_ids(self, problem: Problem) -> list[int]:
        """Token ids of a problem's prompt as the teacher sees it (``teacher_prompt_template``,
        or the student's prompt without one)."""
        if self.teacher_prompt_template is None:
            return self.prompt_ids(problem)
        text = self.teacher_prompt_template.replace("{prompt}", problem.prompt)
        text = text.replace("{answer}", problem.answer)
        return prompt_token_ids(self.tokenizer, text, self.chat_template)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, without special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------- teacher responses

    def _dataset_responses(self, split: str, problems: list[Problem]) -> list[list[int] | None]:
        """The dataset's own response token ids per problem (``None`` where to generate)."""
        responses: list[list[int] | None] = [None] * len(problems)
        if self.teacher_responses.source != "generate":
            for i, problem in enumerate(problems):
                if problem.response is not None:
                    responses[i] = response_token_ids(self.tokenizer, problem.response)
        missing = [i for i, r in enumerate(responses) if r is None]
        if missing and self.teacher_responses.source == "dataset":
            raise ValueError(
                f"data.teacher_responses.source=dataset, but {len(missing)} {split} problems "
                f"have no response (first: id {problems[missing[0]].id!r}); add responses or set "
                "data.teacher_responses.source to auto or generate."
            )
        return responses

    def missing_responses(self, split: str) -> list[int]:
        """Indices of the problems of ``split`` whose teacher response is still to generate."""
        return [i for i, r in enumerate(self._responses.get(split, [])) if r is None]

    def set_responses(
        self, split: str, indices: Sequence[int], responses: Sequence[list[int]]
    ) -> None:
        """Set generated teacher responses (token ids ending with EOS when complete) of the
        problems ``indices`` of ``split``."""
        for i, ids in zip(indices, responses, strict=True):
            self._responses[split][i] = list(ids)

    def build_examples(self) -> None:
        """Turn problems and responses into training and validation examples (once every
        response is known); with ``teacher_responses.drop_incorrect``, keep only the training
        problems whose response the verifier accepts."""
        if self._examples:
            return
        lengths: list[tuple[int, int]] = []
        for split in ("train", "val"):
            problems = self.problems(split)
            if not problems:
                continue
            if self.missing_responses(split):
                raise RuntimeError(
                    f"DistillDataModule: {len(self.missing_responses(split))} {split} problems "
                    "have no teacher response yet; lrkd.callbacks.pacing.PassRatePacing "
                    "generates them with the teacher (add it to trainer.callbacks; lrkd fit "
                    "does), or give responses in the data (data.teacher_responses.source: dataset)."
                )
            responses: list[list[int]] = list(self._responses[split])  # type: ignore[arg-type]
            if self.teacher_responses.drop_incorrect and split == "train":
                keep = [i for i, (p, r) in enumerate(zip(problems, responses, strict=True))
                        if self.verifier(self.decode(r), p.answer)]  # fmt: skip
                log.info("lrkd: %d of %d teacher responses are correct; training on those",
                         len(keep), len(problems))  # fmt: skip
                if not keep:
                    raise RuntimeError(
                        "data.teacher_responses.drop_incorrect: the teacher answers none of the "
                        "training problems correctly."
                    )
                self.train_problems = [problems[i] for i in keep]
                self._prompts["train"] = [self._prompts["train"][i] for i in keep]
                if self._teacher_prompts:
                    self._teacher_prompts["train"] = [self._teacher_prompts["train"][i]
                                                      for i in keep]  # fmt: skip
                responses = [responses[i] for i in keep]
                self._responses["train"] = list(responses)
                self._derived = None
            self._examples[split] = _Examples(
                self._prompts[split], responses, self.seq_length,
                self._teacher_prompts.get(split), self.overlong,
            )  # fmt: skip
            lengths += [(len(p), len(r)) for p, r in zip(self._prompts[split], responses,
                                                         strict=True)]  # fmt: skip
        warn_long_rows(lengths, self.seq_length, self.overlong, "problems")

    def examples(self, split: str) -> Dataset | None:
        """The prompt + response examples of ``split`` (after :meth:`build_examples`)."""
        return self._examples.get(split)

    # ---------------------------------------------------------------------------- pacing

    def set_pass_rates(self, correct: torch.Tensor) -> None:
        """Set the per-problem correct counts (out of ``rollouts.num_samples``) and re-weight."""
        if correct.shape != (len(self.train_problems),):
            raise ValueError(
                f"expected {len(self.train_problems)} counts, got shape {tuple(correct.shape)}"
            )
        pacing = self.pacing
        weights = pacing_weights(
            correct, self.rollouts.num_samples, pacing.weighting, pacing.alpha, pacing.beta,
            pacing.cold_start, pacing.min_frontier,
        )  # fmt: skip
        self.correct = correct.to(torch.int64).cpu()
        self.weight, self.cold_started = weights.weight, weights.cold_start
        self._derived = None

    def begin_estimate(self) -> int:
        """Start a new estimate round and return its number (it seeds the round's samples)."""
        self.rounds += 1
        return self.rounds

    def record_estimate(self, step: int, epoch: int) -> None:
        """Note that an estimate round was taken at ``step`` / ``epoch`` (saved in checkpoints;
        the round number seeds the next round's samples)."""
        self.last_estimate = {"step": step, "epoch": epoch}

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(support, relative weight, loss weight), derived once per change of the weights."""
        if self._derived is None:
            weight = self.weight
            if weight is None:  # not estimated yet: plain distillation
                weight = torch.ones(len(self.train_problems), dtype=torch.float64)
            if self.pacing.skip_zero_weight:
                support = torch.nonzero(weight > 0).flatten()
            else:
                support = torch.arange(len(weight))
            relative = weight / weight[support].mean()
            sampling = self.pacing.apply_weights == "sampling"
            loss = torch.ones_like(relative) if sampling else relative
            self._derived = (support, relative, loss.float())
        return self._derived

    def support(self) -> torch.Tensor:
        """Indices of the training problems the sampler draws in ``loss_weight`` mode."""
        return self._weights()[0]

    def relative_weights(self) -> torch.Tensor:
        """``w / mean(w over the drawn problems)`` per training problem (float64)."""
        return self._weights()[1]

    def sampling_probabilities(self) -> torch.Tensor:
        """The probability of drawing each training problem in ``sampling`` mode."""
        relative = self.relative_weights()
        return relative / relative.sum()

    def loss_weights(self) -> torch.Tensor:
        """The per-problem loss weight: the relative weight in ``loss_weight`` mode (a drawn
        example weighs 1 on average), 1 in ``sampling`` mode."""
        return self._weights()[2]

    def batch_weight(self, problem_index: torch.Tensor) -> torch.Tensor:
        """The loss weights of a batch's examples, on the batch's device."""
        return self.loss_weights()[problem_index.cpu()].to(problem_index.device)

    # ------------------------------------------------------------------------- dataloaders

    def _loader(self, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=partial(pad_collate, pad_token_id=pad),
        )

    def train_dataloader(self) -> DataLoader:
        """Batches drawn by the current pass-rate weights (the checkpoint's, when resuming)."""
        self.build_examples()
        restored = self._restored or {}
        self.restore_pass_rates()
        n = self.samples_per_epoch or len(self.train_problems)
        sampler = PacedSampler(self, n, self.seed)
        if self.trainer is not None:
            # Lightning sets the epoch later; with worker processes it draws before that.
            sampler.set_epoch(self.trainer.current_epoch)
        if restored.get("sampler") and restored.get("problem_ids") == [
            p.id for p in self.train_problems
        ]:  # fmt: skip
            sampler.load_state_dict(restored["sampler"])
        self._sampler = sampler
        return self._loader(self._examples["train"], sampler.for_ranks())

    def val_dataloader(self) -> DataLoader | list:
        """Held-out problems with teacher responses (for the divergence)."""
        self.build_examples()
        dataset = self._examples.get("val")
        return self._loader(dataset, None) if dataset is not None else []

    def test_dataloader(self) -> DataLoader | list:
        """The held-out split, used for ``lrkd test``."""
        return self.val_dataloader()

    # ---------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The pacing state: the last estimate's counts and when it was taken; and the
        sampler's position in the epoch (:meth:`PacedSampler.state_dict`)."""
        if self._sampler is not None:
            sampler = self._sampler.state_dict()
        else:
            sampler = (self._restored or {}).get("sampler")
        return {
            "correct": self.correct,
            "rounds": self.rounds,
            "last_estimate": dict(self.last_estimate),
            "problem_ids": [p.id for p in self.train_problems],
            "sampler": sampler,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the pacing state and the sampler's position of a checkpoint (applied once the
        problems are built)."""
        self.rounds = int(state_dict.get("rounds", 0))
        self.last_estimate = dict(state_dict.get("last_estimate", self.last_estimate))
        self._restored = state_dict

    def restore_pass_rates(self) -> None:
        """Apply the pass rates of a restored checkpoint (a no-op without one), unless its
        problems differ from the data's (then they are estimated again)."""
        state, self._restored = self._restored, None
        if state is None or state.get("correct") is None:
            return
        if state.get("problem_ids") != [p.id for p in self.train_problems]:
            log.warning("lrkd: the checkpoint's problems differ from the data's; the pass "
                        "rates will be estimated again")  # fmt: skip
            self.last_estimate = {"step": None, "epoch": None}
            return
        self.set_pass_rates(state["correct"])


def _check_settings(
    prompt_template: str,
    teacher_prompt_template: str | None,
    responses: TeacherResponses,
    rollouts: Rollouts,
    pacing: Pacing,
    validation: Validation,
    *,
    val_fraction: float,
    overlong: str,
    problem_kinds: Sequence[str],
    difficulties: Sequence[int],
    **at_least: tuple[float | None, float],
) -> None:
    """Every DataModule setting that can be checked before data is read, by its config name.
    ``at_least`` maps more settings (their names after ``data.``) to ``(value, minimum)``."""
    check_choice("data.pacing.weighting", pacing.weighting, WEIGHTINGS)
    check_choice("data.pacing.apply_weights", pacing.apply_weights, APPLY_MODES)
    check_choice("data.pacing.cold_start", pacing.cold_start, COLD_STARTS)
    check_choice("data.teacher_responses.source", responses.source, _RESPONSE_SOURCES)
    check_choice("data.overlong", overlong, OVERLONG_MODES)
    if "{prompt}" not in prompt_template:
        raise ValueError(
            f"data.prompt_template={prompt_template!r} must contain {{prompt}}, where the "
            "problem's prompt goes."
        )
    if teacher_prompt_template is not None and "{prompt}" not in teacher_prompt_template:
        raise ValueError(
            f"data.teacher_prompt_template={teacher_prompt_template!r} must contain "
            "{prompt}, where the problem's prompt goes."
        )
    if not problem_kinds or any(kind not in KINDS for kind in problem_kinds):
        raise ValueError(
            f"data.problem_kinds={list(problem_kinds)}; choose some of {', '.join(KINDS)}."
        )
    if not difficulties or any(level not in DIFFICULTIES for level in difficulties):
        raise ValueError(
            f"data.difficulties={list(difficulties)}; choose some of "
            f"{', '.join(map(str, DIFFICULTIES))}."
        )
    check_fraction("data.val_fraction", val_fraction)
    at_least.update({
        "rollouts.num_samples": (rollouts.num_samples, 1),
        "rollouts.batch_size": (rollouts.batch_size, 1),
        "validation.num_samples": (validation.num_samples, 0),
        "validation.max_problems": (validation.max_problems, 1),
        "pacing.alpha": (pacing.alpha, 0),
        "pacing.beta": (pacing.beta, 0),
        "pacing.min_frontier": (pacing.min_frontier, 0),
        "pacing.estimate_every_n_epochs": (pacing.estimate_every_n_epochs, 0),
        "pacing.estimate_every_n_steps": (pacing.estimate_every_n_steps, 0),
    })  # fmt: skip
    for name, (value, minimum) in at_least.items():
        check_at_least(f"data.{name}", value, minimum)
    check_sampling(rollouts.max_new_tokens, rollouts.temperature, rollouts.top_p,
                   "data.rollouts.")  # fmt: skip
    check_sampling(responses.max_new_tokens, responses.temperature, 1.0,
                   "data.teacher_responses.")  # fmt: skip
    try:
        StopSequences.of(rollouts.stop)
    except ValueError as err:
        raise ValueError(f"data.rollouts.{err}") from err


def _check_unique_ids(problems: Sequence[Problem]) -> None:
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise ValueError(
                f"problem id {problem.id!r} occurs in both the training and the validation "
                "problems (or twice); ids must be unique."
            )
        seen.add(problem.id)
