"""PassRatePacing: the model work of paced data, between a DistillDataModule and the models.

The :class:`~lrkd.data.datamodule.DistillDataModule` holds problems, prompts, responses,
weights and the sampler. This callback takes the teacher and the student from the
LightningModule (any module with ``teacher`` and ``student``) and

1. generates the teacher responses the data lacks, once, before the first dataloader is made
   (cached on disk: :mod:`lrkd.generation.responses`), and the teacher's greedy pass@1 on the
   held-out problems;
2. estimates the student's pass rates (K samples per training problem, a verifier) before the
   first step and then every ``estimate_every_n_epochs`` epochs or ``estimate_every_n_steps``
   steps, and hands the counts to the DataModule, which re-weights;
3. attaches each training batch's per-example weights;
4. logs the student's greedy ``val/pass@1`` and sampled ``val/pass_rate`` after validation.

``lrkd fit`` adds it when the data is a DistillDataModule; in Python put it in the Trainer's
callbacks.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lrkd.callbacks.diagnostics import log_pacing
from lrkd.data.datamodule import DistillDataModule
from lrkd.data.pacing import bucket_labels, bucketize, pass_rates
from lrkd.generation.pass_rates import count_correct
from lrkd.generation.responses import teacher_responses
from lrkd.generation.sampling import generation_model
from lrkd.seeds import row_seed

log = logging.getLogger("lrkd")

__all__ = ["PassRatePacing", "TeacherAndStudent"]


@runtime_checkable
class TeacherAndStudent(Protocol):
    """What PassRatePacing needs of the LightningModule."""

    teacher: nn.Module
    student: nn.Module


class PassRatePacing(Callback):
    """Teacher responses, pass-rate estimates, batch weights and pass@1 for a
    :class:`~lrkd.data.datamodule.DistillDataModule` (see the module docstring).

    Args:
        datamodule: the DataModule to pace; ``None`` (the usual): the Trainer's. Give it to call
            :meth:`prepare_responses`, :meth:`estimate` or :meth:`evaluate` outside ``fit``.
    """

    def __init__(self, datamodule: DistillDataModule | None = None) -> None:
        self.datamodule = datamodule
        self.teacher_pass_at_1: float | None = None

    def _parts(self, trainer: Trainer, pl_module: LightningModule) -> DistillDataModule:
        datamodule = self.datamodule or trainer.datamodule
        if not isinstance(datamodule, DistillDataModule):
            raise TypeError(
                "PassRatePacing paces a lrkd.data.datamodule.DistillDataModule; the data is a "
                f"{type(datamodule).__name__}. Remove the callback or use DistillDataModule."
            )
        if not isinstance(pl_module, TeacherAndStudent):
            raise TypeError(
                "PassRatePacing needs a LightningModule with .teacher and .student (e.g. "
                f"lrkd.module.DistillationModule), not {type(pl_module).__name__}."
            )
        return datamodule

    # ----------------------------------------------------------------- teacher responses
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the parts; outside ``fit`` (validate, test), make the data now."""
        dm = self._parts(trainer, pl_module)
        if stage != "fit":
            dm.setup(stage)
            self.prepare_responses(trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Generate missing teacher responses (models on their devices, sharded if FSDP2)."""
        self.prepare_responses(trainer, pl_module)

    def prepare_responses(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the DataModule every missing teacher response and build its examples."""
        dm = self._parts(trainer, pl_module)
        dm.setup("fit")
        for split in ("train", "val"):
            missing = dm.missing_responses(split)
            if not missing:
                continue
            problems = dm.problems(split)
            prompts, settings = dm.teacher_prompts(split), dm.teacher_responses
            with trainer.precision_plugin.forward_context():
                generated = teacher_responses(
                    pl_module.teacher, [prompts[i] for i in missing],
                    [problems[i].id for i in missing], dm.tokenizer,
                    max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                    seed=dm.seed, batch_size=dm.rollouts.batch_size, cache_root=settings.cache_dir,
                    rank=trainer.global_rank, world_size=trainer.world_size, label=split,
                )  # fmt: skip
            dm.set_responses(split, missing, generated)
            if split == "val":
                solved = [dm.verifier(dm.decode(ids), problems[i].answer)
                          for i, ids in zip(missing, generated, strict=True)]  # fmt: skip
                self.teacher_pass_at_1 = sum(solved) / len(solved)
        dm.build_examples()

    # ---------------------------------------------------------------------- pass rates
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Estimate before the first step (``estimate_at_start``), unless a checkpoint's
        estimate was restored."""
        dm = self._parts(trainer, pl_module)
        if dm.pacing.estimate_at_start and dm.correct is None:
            self.estimate(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Re-estimate every ``estimate_every_n_epochs`` epochs."""
        dm = self._parts(trainer, pl_module)
        n = dm.pacing.estimate_every_n_epochs
        epoch = trainer.current_epoch
        if n and epoch > 0 and epoch % n == 0 and dm.last_estimate["epoch"] != epoch:
            self.estimate(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Re-estimate every ``estimate_every_n_steps`` optimizer steps; weight the batch."""
        dm = self._parts(trainer, pl_module)
        n, step = dm.pacing.estimate_every_n_steps, trainer.global_step
        if n and step > 0 and step % n == 0 and dm.last_estimate["step"] != step:
            self.estimate(trainer, pl_module)
        if isinstance(batch, dict) and "problem_index" in batch:
            batch["weight"] = dm.batch_weight(batch["problem_index"])

    def estimate(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor:
        """Estimate the student's pass rate on every training problem, hand the counts to the
        DataModule (which re-weights), and log the estimate. Returns the pass rates [N]."""
        dm = self._parts(trainer, pl_module)
        model = generation_model(pl_module.student)
        round_index = dm.begin_estimate()
        problems, rollouts = dm.train_problems, dm.rollouts
        with trainer.precision_plugin.forward_context():
            correct = count_correct(
                model, dm.prompts("train"), [p.answer for p in problems],
                [p.id for p in problems], dm.verifier, dm.tokenizer,
                num_samples=rollouts.num_samples, seed=row_seed(dm.seed, "estimate", round_index),
                rank=trainer.global_rank, world_size=trainer.world_size,
                reduce_sum=partial(trainer.strategy.reduce, reduce_op="sum"),
                progress=f"pass rates (round {round_index})" if trainer.is_global_zero else False,
                temperature=rollouts.temperature, top_p=rollouts.top_p,
                max_new_tokens=rollouts.max_new_tokens, batch_size=rollouts.batch_size,
                stop=rollouts.stop,
            )  # fmt: skip
        del model
        dm.set_pass_rates(correct)
        dm.record_estimate(trainer.global_step, trainer.current_epoch)
        p = pass_rates(correct, rollouts.num_samples)
        log_pacing(
            trainer.loggers, pass_rate=p, weight=dm.relative_weights(),
            bucket_index=bucketize(p, dm.bucket_edges),
            bucket_labels=bucket_labels(dm.bucket_edges), num_samples=rollouts.num_samples,
            cold_start=dm.cold_started, round_index=round_index, step=trainer.global_step,
        )  # fmt: skip
        frontier = float(((p > 0) & (p < 1)).double().mean())
        log.info("lrkd: pass rates (round %d): mean %.3f, frontier %.1f%%%s", round_index,
                 float(p.mean()), 100 * frontier,
                 " (cold start: uniform weights)" if dm.cold_started else "")  # fmt: skip
        return p

    # ---------------------------------------------------------------------- evaluation
    def evaluate(
        self, trainer: Trainer, pl_module: LightningModule, stage: str = "val"
    ) -> dict[str, float]:
        """The student's greedy pass@1 and mean sampled pass rate on the held-out problems."""
        dm = self._parts(trainer, pl_module)
        problems, rollouts = dm.val_problems[: dm.validation.max_problems], dm.rollouts
        if not problems:
            return {}
        model = generation_model(pl_module.student)
        prompts = dm.prompts("val")[: len(problems)]
        common = {
            "answers": [p.answer for p in problems], "keys": [p.id for p in problems],
            "verifier": dm.verifier, "tokenizer": dm.tokenizer, "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "reduce_sum": partial(trainer.strategy.reduce, reduce_op="sum"),
            "max_new_tokens": rollouts.max_new_tokens, "batch_size": rollouts.batch_size,
            "stop": rollouts.stop,
        }  # fmt: skip
        metrics: dict[str, float] = {}
        with trainer.precision_plugin.forward_context():
            greedy = count_correct(model, prompts, num_samples=1, temperature=0.0, **common)
            metrics[f"{stage}/pass@1"] = float(greedy.double().mean())
            k = dm.validation.num_samples
            if k:
                sampled = count_correct(
                    model, prompts, num_samples=k, temperature=rollouts.temperature,
                    top_p=rollouts.top_p, seed=row_seed(dm.seed, "validate", 0), **common,
                )  # fmt: skip
                metrics[f"{stage}/pass_rate"] = float(sampled.double().mean()) / k
        if stage == "val" and self.teacher_pass_at_1 is not None:
            metrics["val/pass@1_teacher"] = self.teacher_pass_at_1
        return metrics

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.sanity_checking:
            return
        for name, value in self.evaluate(trainer, pl_module, stage=stage).items():
            # Every rank holds the same gathered value, so no reduction is needed.
            pl_module.log(name, value, on_epoch=True, rank_zero_only=False)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log ``val/pass@1``, ``val/pass_rate`` (and once ``val/pass@1_teacher``)."""
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log ``test/pass@1`` and ``test/pass_rate``."""
        self._report(trainer, pl_module, "test")
