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

The estimation and the per-batch weights run in a callback that the DistillationModule adds by
itself (``configure_callbacks``); with another LightningModule, pass
``datamodule.training_callbacks()`` to the Trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lrkd.callbacks.diagnostics import log_pacing
from lrkd.data.pacing import (
    APPLY_MODES,
    COLD_STARTS,
    WEIGHTINGS,
    bucket_labels,
    bucketize,
    check_bucket_edges,
    pacing_weights,
    pass_rates,
)
from lrkd.data.problems import (
    DIFFICULTIES,
    KINDS,
    Problem,
    builtin_problems,
    read_problems,
    split_problems,
)
from lrkd.data.resumable import ResumableSampler
from lrkd.data.text import (
    pad_collate,
    prompt_response_example,
    prompt_token_ids,
    resolve_tokenizer,
    response_token_ids,
)
from lrkd.data.verifiers import Verifier, get_verifier
from lrkd.generation.pass_rates import count_correct
from lrkd.generation.sampling import check_sampling, generate, generation_model
from lrkd.seeds import row_seed

log = logging.getLogger("lrkd")

__all__ = ["DistillDataModule", "PacedSampler", "PacingCallback"]

_RESPONSE_SOURCES = ("auto", "dataset", "generate")


class _Examples(Dataset):
    """Prompt + response examples (:func:`~lrkd.data.text.prompt_response_example`) that also
    carry their problem's index, for the per-example weight, and with ``teacher_prompts`` the
    teacher's view of the same response (``teacher_*`` keys)."""

    def __init__(
        self, prompts: Sequence[list[int]], responses: Sequence[list[int]], seq_length: int,
        teacher_prompts: Sequence[list[int]] | None = None,
    ) -> None:  # fmt: skip
        self.examples = []
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
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
        if dm.apply_weights == "sampling":
            size = min(dm.batch_size, self.num_samples - produced)
            return torch.multinomial(dm.sampling_probabilities(), size, replacement=True,
                                     generator=generator)  # fmt: skip
        support = dm.support()
        order = torch.randperm(len(support), generator=generator)
        return support[order][: self.num_samples - produced]


class PacingCallback(Callback):
    """The training-loop side of :class:`DistillDataModule`: re-estimates pass rates at the
    configured cadence, attaches the per-example weights to each training batch, and reports
    pass@1 at the end of validation."""

    def __init__(self, datamodule: DistillDataModule) -> None:
        self.datamodule = datamodule

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Re-estimate every ``estimate_every_n_epochs`` epochs."""
        dm = self.datamodule
        n = dm.estimate_every_n_epochs
        epoch = trainer.current_epoch
        if n and epoch > 0 and epoch % n == 0 and dm.last_estimate["epoch"] != epoch:
            dm.estimate(trainer)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Re-estimate every ``estimate_every_n_steps`` optimizer steps; weight the batch."""
        dm = self.datamodule
        n, step = dm.estimate_every_n_steps, trainer.global_step
        if n and step > 0 and step % n == 0 and dm.last_estimate["step"] != step:
            dm.estimate(trainer)
        if isinstance(batch, dict) and "problem_index" in batch:
            batch["weight"] = dm.batch_weight(batch["problem_index"])

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.sanity_checking:
            return
        metrics = self.datamodule.evaluate(trainer, stage=stage)
        for name, value in metrics.items():
            # Every rank holds the same gathered value, so no reduction is needed.
            pl_module.log(name, value, on_epoch=True, rank_zero_only=False)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log ``val/pass@1``, ``val/pass_rate`` (and once ``val/pass@1_teacher``)."""
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log ``test/pass@1`` and ``test/pass_rate``."""
        self._report(trainer, pl_module, "test")


class DistillDataModule(LightningDataModule):
    """Verifiable problems with teacher responses, weighted by the student's pass rate (PACED).

    See the module documentation for the data flow, and :mod:`lrkd.data.pacing` for the weight,
    its normalisation and the cold-start rule.

    Args:
        train_files: JSONL problem files (``{"prompt", "answer"}``, optional ``id`` and
            ``response``). ``None`` uses the built-in arithmetic generator.
        val_files: held-out problem files; ``None`` holds out ``val_fraction`` of the training
            problems.
        num_problems: size of the built-in problem set.
        problem_kinds: kinds of built-in problems: ``add``, ``sub``, ``mul``, ``word``.
        difficulties: difficulty levels of built-in problems (1 easiest .. 5).
        val_fraction: share of the problems held out when ``val_files`` is None.
        tokenizer: a built-in name, local directory or hub id; ``None`` takes the teacher's.
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
        teacher_responses: where the training responses come from: ``dataset`` (each
            problem's ``response``), ``generate`` (the teacher answers every problem once; the
            result is cached) or ``auto`` (the dataset's where present, else generated).
        teacher_max_new_tokens: the longest generated teacher response.
        teacher_temperature: sampling temperature of teacher responses (0 is greedy).
        drop_incorrect_teacher_responses: train only on problems whose teacher response the
            verifier accepts.
        response_cache_dir: where generated teacher responses are cached; ``None`` is
            ``$LRKD_CACHE_DIR/responses`` (default ``~/.cache/lrkd/responses``).
        weighting: ``paced`` (``w = p**alpha (1-p)**beta``), ``uniform`` or ``hard_filter``
            (1 for 0 < p < 1, else 0).
        alpha: exponent of p in the PACED weight.
        beta: exponent of 1 - p in the PACED weight.
        apply_weights: ``loss_weight`` (multiply each example's divergence by
            ``w / mean(w)``) or ``sampling`` (draw problems with probability ``w / sum(w)``).
        skip_zero_weight: in ``loss_weight`` mode, do not draw problems with w = 0 (they would
            cost a forward and backward pass and contribute nothing).
        cold_start: when fewer than ``min_frontier`` problems have w > 0: ``uniform`` (plain
            distillation until a frontier appears), ``laplace`` (weights of the smoothed rate
            ``(c+1)/(K+2)``) or ``error``.
        min_frontier: the fewest problems with w > 0 for the weights to be used as they are.
        bucket_edges: interior pass-rate edges of the buckets; the buckets are ``p=0``,
            ``(0, e1]``, ..., ``(em, 1)``, ``p=1``.
        num_rollouts: student samples per problem for a pass-rate estimate (K).
        rollout_temperature: sampling temperature of the student's samples.
        rollout_top_p: nucleus-sampling mass of the student's samples.
        rollout_max_new_tokens: the longest sampled answer.
        rollout_batch_size: sequences per generation forward pass.
        estimate_at_start: estimate pass rates before the first training step (else train
            uniformly until the first re-estimation).
        estimate_every_n_epochs: re-estimate every this many epochs (``None`` or 0: never).
        estimate_every_n_steps: re-estimate every this many optimizer steps (``None``: never).
        val_num_rollouts: samples per held-out problem for ``val/pass_rate`` (0 disables it;
            greedy ``val/pass@1`` is always reported).
        val_max_problems: evaluate pass rates on at most this many held-out problems.
        samples_per_epoch: training examples per epoch; ``None`` is the number of training
            problems.
        seq_length: prompt + response rows are truncated to this many tokens.
        batch_size: examples per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the built-in problems, the split, the sampler and the rollouts.
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        num_problems: int = 1000,
        problem_kinds: list[str] = list(KINDS),  # noqa: B006 - jsonargparse needs a literal
        difficulties: list[int] = list(DIFFICULTIES),  # noqa: B006
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        chat_template: bool = True,
        prompt_template: str = "{prompt}",
        teacher_prompt_template: str | None = None,
        verifier: Verifier | str = "final_number",
        teacher_responses: str = "auto",
        teacher_max_new_tokens: int = 64,
        teacher_temperature: float = 0.0,
        drop_incorrect_teacher_responses: bool = False,
        response_cache_dir: str | None = None,
        weighting: str = "paced",
        alpha: float = 1.0,
        beta: float = 1.0,
        apply_weights: str = "loss_weight",
        skip_zero_weight: bool = True,
        cold_start: str = "uniform",
        min_frontier: int = 1,
        bucket_edges: list[float] = [0.25, 0.5, 0.75],  # noqa: B006
        num_rollouts: int = 8,
        rollout_temperature: float = 1.0,
        rollout_top_p: float = 1.0,
        rollout_max_new_tokens: int = 64,
        rollout_batch_size: int = 32,
        estimate_at_start: bool = True,
        estimate_every_n_epochs: int | None = 1,
        estimate_every_n_steps: int | None = None,
        val_num_rollouts: int = 4,
        val_max_problems: int | None = None,
        samples_per_epoch: int | None = None,
        seq_length: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_choice("weighting", weighting, WEIGHTINGS)
        _check_choice("apply_weights", apply_weights, APPLY_MODES)
        _check_choice("cold_start", cold_start, COLD_STARTS)
        _check_choice("teacher_responses", teacher_responses, _RESPONSE_SOURCES)
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
        positive = {"num_rollouts": num_rollouts, "batch_size": batch_size,
                    "rollout_batch_size": rollout_batch_size, "num_problems": num_problems,
                    "seq_length": seq_length}  # fmt: skip
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"data.{name} must be at least 1, got {value}")
        check_sampling(rollout_max_new_tokens, rollout_temperature, rollout_top_p, "data.rollout_")
        if val_num_rollouts < 0:
            raise ValueError(f"data.val_num_rollouts must be >= 0, got {val_num_rollouts}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"data.alpha and data.beta must be >= 0, got {alpha}, {beta}")
        self.bucket_edges = check_bucket_edges(bucket_edges)
        self.verifier = get_verifier(verifier)
        self.train_files, self.val_files = train_files, val_files
        self.num_problems, self.problem_kinds = num_problems, list(problem_kinds)
        self.difficulties, self.val_fraction = list(difficulties), val_fraction
        self.tokenizer_name, self.chat_template = tokenizer, chat_template
        self.prompt_template = prompt_template
        self.teacher_prompt_template = teacher_prompt_template
        self.teacher_responses = teacher_responses
        self.teacher_generation = {"max_new_tokens": teacher_max_new_tokens,
                                   "temperature": teacher_temperature}  # fmt: skip
        self.drop_incorrect_teacher_responses = drop_incorrect_teacher_responses
        self.response_cache_dir = response_cache_dir
        self.weighting, self.alpha, self.beta = weighting, alpha, beta
        self.apply_weights, self.skip_zero_weight = apply_weights, skip_zero_weight
        self.cold_start, self.min_frontier = cold_start, min_frontier
        self.num_rollouts = num_rollouts
        self.rollout = {"temperature": rollout_temperature, "top_p": rollout_top_p,
                        "max_new_tokens": rollout_max_new_tokens,
                        "batch_size": rollout_batch_size}  # fmt: skip
        self.estimate_at_start = estimate_at_start
        self.estimate_every_n_epochs = estimate_every_n_epochs
        self.estimate_every_n_steps = estimate_every_n_steps
        self.val_num_rollouts, self.val_max_problems = val_num_rollouts, val_max_problems
        self.samples_per_epoch = samples_per_epoch
        self.seq_length, self.batch_size = seq_length, batch_size
        self.num_workers, self.seed = num_workers, seed

        self.tokenizer: Any = None
        self.train_problems: list[Problem] = []
        self.val_problems: list[Problem] = []
        self._prompts: dict[str, list[list[int]]] = {}
        self._teacher_prompts: dict[str, list[list[int]]] = {}
        self._datasets: dict[str, Dataset] = {}
        # The pacing state (saved in checkpoints): counts of the last estimate and the weights.
        self.correct: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None  # raw w per training problem (float64)
        self._derived: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.cold_started = False
        self.rounds = 0
        self.last_estimate: dict[str, int | None] = {"step": None, "epoch": None}
        self.teacher_pass_at_1: float | None = None
        self._restored: dict[str, Any] | None = None
        self._sampler: PacedSampler | None = None

    # ----------------------------------------------------------------------------- problems

    def setup(self, stage: str | None = None) -> None:
        """Read or generate the problems, split them and tokenise the prompts (once)."""
        if self.train_problems:
            return
        self.tokenizer = self._resolve_tokenizer()
        if self.train_files:
            problems = [p for f in self.train_files for p in read_problems(f)]
        else:
            problems = builtin_problems(
                self.num_problems, self.seed, self.problem_kinds, self.difficulties
            )
        if self.val_files:
            train, val = problems, [p for f in self.val_files for p in read_problems(f)]
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

    def _resolve_tokenizer(self) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        return resolve_tokenizer(self.tokenizer_name, self.trainer)

    # ------------------------------------------------------------------- teacher responses

    def _models(self) -> tuple[nn.Module, nn.Module]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        teacher, student = getattr(module, "teacher", None), getattr(module, "student", None)
        if teacher is None or student is None:
            raise RuntimeError(
                "DistillDataModule needs a LightningModule with .teacher and .student (e.g. "
                "lrkd.module.DistillationModule) attached to a Trainer."
            )
        return teacher, student

    def _prepare(self) -> None:
        """Build the training and validation examples (teacher responses) once."""
        if self._datasets:
            return
        if not self.train_problems:
            self.setup()
        for split in ("train", "val"):
            problems = self.train_problems if split == "train" else self.val_problems
            if not problems:
                continue
            responses = self._responses(split, problems)
            if self.drop_incorrect_teacher_responses and split == "train":
                keep = [i for i, (p, r) in enumerate(zip(problems, responses, strict=True))
                        if self.verifier(self._decode(r), p.answer)]  # fmt: skip
                log.info("lrkd: %d of %d teacher responses are correct; training on those",
                         len(keep), len(problems))  # fmt: skip
                if not keep:
                    raise RuntimeError(
                        "data.drop_incorrect_teacher_responses: the teacher answers none of the "
                        "training problems correctly."
                    )
                self.train_problems = [problems[i] for i in keep]
                self._prompts["train"] = [self._prompts["train"][i] for i in keep]
                if self._teacher_prompts:
                    self._teacher_prompts["train"] = [self._teacher_prompts["train"][i]
                                                      for i in keep]  # fmt: skip
                responses = [responses[i] for i in keep]
                self._derived = None
            self._datasets[split] = _Examples(
                self._prompts[split], responses, self.seq_length,
                self._teacher_prompts.get(split),
            )  # fmt: skip

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _responses(self, split: str, problems: list[Problem]) -> list[list[int]]:
        """Response token ids (ending with EOS when complete) for every problem of a split."""
        responses: list[list[int] | None] = [None] * len(problems)
        if self.teacher_responses != "generate":
            for i, problem in enumerate(problems):
                if problem.response is not None:
                    responses[i] = response_token_ids(self.tokenizer, problem.response)
        missing = [i for i, r in enumerate(responses) if r is None]
        if missing and self.teacher_responses == "dataset":
            raise ValueError(
                f"data.teacher_responses=dataset, but {len(missing)} {split} problems have no "
                f"response (first: id {problems[missing[0]].id!r}); add responses or set "
                "data.teacher_responses to auto or generate."
            )
        if missing:
            prompts = self._teacher_prompts.get(split) or self._prompts[split]
            generated = self._generate_responses(
                split, [problems[i] for i in missing], [prompts[i] for i in missing]
            )
            for i, ids in zip(missing, generated, strict=True):
                responses[i] = ids
        if split == "val" and missing and self.trainer is not None:
            solved = [self.verifier(self._decode(responses[i]), problems[i].answer)
                      for i in missing]  # fmt: skip
            self.teacher_pass_at_1 = sum(solved) / len(solved)
        return [r for r in responses if r is not None]

    def _generate_responses(
        self, split: str, problems: list[Problem], prompts: list[list[int]]
    ) -> list[list[int]]:
        teacher, _ = self._models()
        settings = {**self.teacher_generation, "seed": self.seed}
        path = self._cache_path(teacher, problems, prompts, settings)
        if path.is_file():
            cached = [json.loads(line) for line in path.read_text().splitlines()]
            if [c["id"] for c in cached] == [p.id for p in problems]:
                log.info("lrkd: %d %s teacher responses from %s", len(cached), split, path)
                return [c["ids"] for c in cached]
        trainer = self.trainer
        rank, world = trainer.global_rank, trainer.world_size
        model = generation_model(teacher)  # sharded (FSDP2): an unsharded copy on every rank
        with trainer.precision_plugin.forward_context():
            rollouts = generate(
                model,
                prompts[rank::world],
                num_samples=1,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                batch_size=self.rollout["batch_size"],
                keys=[p.id for p in problems[rank::world]],
                progress=f"teacher responses ({split})" if rank == 0 else False,
                **settings,
            )
        del model
        mine = [c[0] for c in rollouts.completion_ids]
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, mine)
            ids = [gathered[i % world][i // world] for i in range(len(problems))]
        else:
            ids = mine
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text("".join(json.dumps({"id": p.id, "ids": r}) + "\n"
                                   for p, r in zip(problems, ids, strict=True)))  # fmt: skip
            tmp.replace(path)
            log.info("lrkd: cached %d %s teacher responses at %s", len(ids), split, path)
        return ids

    def _cache_path(
        self, teacher: nn.Module, problems: list[Problem], prompts: list[list[int]],
        settings: dict[str, Any],
    ) -> Path:  # fmt: skip
        digest = hashlib.sha256()
        digest.update(_fingerprint(teacher).encode())
        digest.update(json.dumps(settings, sort_keys=True).encode())
        digest.update(str(self.tokenizer.eos_token_id).encode())
        for problem, prompt in zip(problems, prompts, strict=True):
            digest.update(f"{problem.id}\0{prompt}\0".encode())
        root = self.response_cache_dir
        if root is None:
            from lrkd.models.zoo import cache_dir

            root = str(cache_dir() / "responses")
        return Path(root) / f"teacher-{digest.hexdigest()[:20]}.jsonl"

    # ---------------------------------------------------------------------------- pacing

    def estimate(self, trainer: Trainer | None = None) -> torch.Tensor:
        """Estimate the current student's pass rate on every training problem, re-weight, and
        log the estimate. Returns the pass rates [N] (float64)."""
        trainer = trainer or self.trainer
        _, student = self._models()
        model = generation_model(student)
        self.rounds += 1
        problems = self.train_problems
        with trainer.precision_plugin.forward_context():
            correct = count_correct(
                model,
                self._prompts["train"],
                [p.answer for p in problems],
                [p.id for p in problems],
                self.verifier,
                self.tokenizer,
                num_samples=self.num_rollouts,
                seed=row_seed(self.seed, "estimate", self.rounds),
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                reduce_sum=partial(trainer.strategy.reduce, reduce_op="sum"),
                progress=f"pass rates (round {self.rounds})" if trainer.is_global_zero else False,
                **self.rollout,
            )
        del model
        self.set_pass_rates(correct)
        self.last_estimate = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        p = pass_rates(correct, self.num_rollouts)
        log_pacing(
            trainer.loggers,
            pass_rate=p,
            weight=self.relative_weights(),
            bucket_index=bucketize(p, self.bucket_edges),
            bucket_labels=bucket_labels(self.bucket_edges),
            num_samples=self.num_rollouts,
            cold_start=self.cold_started,
            round_index=self.rounds,
            step=trainer.global_step,
        )
        frontier = float(((p > 0) & (p < 1)).double().mean())
        log.info("lrkd: pass rates (round %d): mean %.3f, frontier %.1f%%%s", self.rounds,
                 float(p.mean()), 100 * frontier,
                 " (cold start: uniform weights)" if self.cold_started else "")  # fmt: skip
        return p

    def set_pass_rates(self, correct: torch.Tensor) -> None:
        """Set the per-problem correct counts (out of ``num_rollouts``) and re-weight."""
        if correct.shape != (len(self.train_problems),):
            raise ValueError(
                f"expected {len(self.train_problems)} counts, got shape {tuple(correct.shape)}"
            )
        weights = pacing_weights(
            correct, self.num_rollouts, self.weighting, self.alpha, self.beta,
            self.cold_start, self.min_frontier,
        )  # fmt: skip
        self.correct = correct.to(torch.int64).cpu()
        self.weight, self.cold_started = weights.weight, weights.cold_start
        self._derived = None

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(support, relative weight, loss weight), derived once per change of the weights."""
        if self._derived is None:
            weight = self.weight
            if weight is None:  # not estimated yet: plain distillation
                weight = torch.ones(len(self.train_problems), dtype=torch.float64)
            if self.skip_zero_weight:
                support = torch.nonzero(weight > 0).flatten()
            else:
                support = torch.arange(len(weight))
            relative = weight / weight[support].mean()
            loss = torch.ones_like(relative) if self.apply_weights == "sampling" else relative
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

    # -------------------------------------------------------------------------- evaluation

    def evaluate(self, trainer: Trainer | None = None, stage: str = "val") -> dict[str, float]:
        """The student's greedy pass@1 and mean sampled pass rate on the held-out problems."""
        trainer = trainer or self.trainer
        problems = self.val_problems[: self.val_max_problems]
        if not problems:
            return {}
        _, student = self._models()
        model = generation_model(student)
        prompts = self._prompts["val"][: len(problems)]
        common = {
            "answers": [p.answer for p in problems],
            "keys": [p.id for p in problems],
            "verifier": self.verifier,
            "tokenizer": self.tokenizer,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "reduce_sum": partial(trainer.strategy.reduce, reduce_op="sum"),
            "max_new_tokens": self.rollout["max_new_tokens"],
            "batch_size": self.rollout["batch_size"],
        }
        metrics: dict[str, float] = {}
        with trainer.precision_plugin.forward_context():
            greedy = count_correct(model, prompts, num_samples=1, temperature=0.0, **common)
            metrics[f"{stage}/pass@1"] = float(greedy.double().mean())
            if self.val_num_rollouts:
                sampled = count_correct(
                    model, prompts, num_samples=self.val_num_rollouts,
                    temperature=self.rollout["temperature"], top_p=self.rollout["top_p"],
                    seed=row_seed(self.seed, "validate", 0), **common,
                )  # fmt: skip
                metrics[f"{stage}/pass_rate"] = float(sampled.double().mean()) / (
                    self.val_num_rollouts
                )
        if stage == "val" and self.teacher_pass_at_1 is not None:
            metrics["val/pass@1_teacher"] = self.teacher_pass_at_1
        return metrics

    # ------------------------------------------------------------------------- dataloaders

    def training_callbacks(self) -> list[Callback]:
        """The callbacks that run the pacing during training (added by the
        DistillationModule itself)."""
        return [PacingCallback(self)]

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
        """Batches drawn by the current pass-rate weights (estimating them first if due)."""
        self._prepare()
        restored = self._restored or {}
        self._apply_restored()
        if self.estimate_at_start and self.correct is None:
            self.estimate()
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
        return self._loader(self._datasets["train"], sampler)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out problems with teacher responses (for the divergence)."""
        self._prepare()
        dataset = self._datasets.get("val")
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

    def _apply_restored(self) -> None:
        state, self._restored = self._restored, None
        if state is None or state.get("correct") is None:
            return
        if state.get("problem_ids") != [p.id for p in self.train_problems]:
            log.warning("lrkd: the checkpoint's problems differ from the data's; the pass "
                        "rates will be estimated again")  # fmt: skip
            self.last_estimate = {"step": None, "epoch": None}
            return
        self.set_pass_rates(state["correct"])


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"data.{name}={value!r}; choose one of {', '.join(choices)}.")


def _check_unique_ids(problems: Sequence[Problem]) -> None:
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise ValueError(
                f"problem id {problem.id!r} occurs in both the training and the validation "
                "problems (or twice); ids must be unique."
            )
        seen.add(problem.id)


def _fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model: its class, config and a sample of its weights (the same
    whether the model is sharded by FSDP2 or not; all ranks must call it together then)."""
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256(type(model).__name__.removeprefix("FSDP").encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    params = list(model.parameters())
    for param in params[:2] + params[-2:]:
        tensor = param.full_tensor() if isinstance(param, DTensor) else param
        sample = tensor.detach().flatten()[:4096].float().cpu()
        digest.update(str(param.dtype).encode() + sample.numpy().tobytes())
    return digest.hexdigest()
