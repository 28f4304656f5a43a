"""LMEvalCallback: score the student with lm-evaluation-harness while it trains.

A config adds it to the Trainer's callbacks::

    trainer:
      callbacks:
        - class_path: lrkd.callbacks.lm_eval.LMEvalCallback
          init_args:
            tasks: [lrkd_arithmetic]
            limit: 50
            every_n_steps: 100
            at_fit_start: true     # step 0: the before of before/after in TensorBoard
            teacher: true          # the teacher once, as eval/<task>/<metric>_teacher

Each call logs ``eval/<task>/<metric>`` (and ``eval/seconds``, the call's wall time) to every
logger at the current step. It runs on rank 0 while the other ranks wait; a low-rank clone is
multiplied out first, as for pass-rate rollouts, and the training RNG state is restored after
(lm-eval seeds its own generators), so adding the callback does not change the training run.
It needs the ``eval`` extra; a config that uses it without lm-eval installed stops when the
Trainer is built, with the pip command.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lrkd.evaluation.harness import (
    EvalSettings,
    check_tasks,
    evaluate,
    require_lm_eval,
    scores,
    task_manager,
)
from lrkd.generation.sampling import generation_model
from lrkd.models.protocols import Materializable

log = logging.getLogger("lrkd")

__all__ = ["EvaluatedModule", "LMEvalCallback"]

_FIELD = "LMEvalCallback"


@runtime_checkable
class EvaluatedModule(Protocol):
    """What LMEvalCallback needs of the LightningModule (e.g. lrkd.module.DistillationModule)."""

    student: nn.Module
    teacher: nn.Module
    tokenizer: Any


class LMEvalCallback(Callback):
    """Score the student with lm-evaluation-harness every N steps, before the first step and/or
    after the last, and log ``eval/<task>/<metric>`` (see the module docstring).

    Args:
        tasks: lm-eval task names; keep them small, they run inside training (lrkd's built-in
            ``lrkd_arithmetic``, ``lrkd_word``, ``lrkd_corpus`` need no download).
        every_n_steps: evaluate every this many optimizer steps (``None``: not during training).
        at_fit_start: evaluate once before the first training step (not when resuming).
        at_fit_end: evaluate once after the last step (unless that step was just evaluated).
        teacher: also evaluate the teacher, once, at the first call, logged as
            ``eval/<task>/<metric>_teacher``.
        limit: evaluate only the first this many items of each task (``None``: all).
        batch_size: sequences per forward pass.
        num_fewshot: few-shot examples per prompt (``None``: each task's own).
        apply_chat_template: give prompts as a user turn of the tokenizer's chat template.
        include_path: folders of task YAML files of your own.
    """

    def __init__(
        self,
        tasks: list[str],
        every_n_steps: int | None = None,
        at_fit_start: bool = False,
        at_fit_end: bool = True,
        teacher: bool = False,
        limit: int | None = None,
        batch_size: int = 8,
        num_fewshot: int | None = None,
        apply_chat_template: bool = True,
        include_path: list[str] | None = None,
    ) -> None:
        require_lm_eval(f"trainer.callbacks: {_FIELD}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"{_FIELD}.every_n_steps={every_n_steps}: give at least 1, or null")
        if not (every_n_steps or at_fit_start or at_fit_end):
            raise ValueError(
                f"{_FIELD}: every_n_steps is null and at_fit_start and at_fit_end are false, so "
                "it would never evaluate; set one of them"
            )
        if not tasks:
            raise ValueError(f"{_FIELD}.tasks: give at least one task, e.g. [lrkd_arithmetic]")
        self.tasks = list(tasks)
        self.every_n_steps = every_n_steps
        self.at_fit_start, self.at_fit_end = at_fit_start, at_fit_end
        self.teacher = teacher
        self.settings = EvalSettings(
            batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
            apply_chat_template=apply_chat_template,
        )  # fmt: skip
        self.include_path = list(include_path or [])
        self.history: list[dict[str, float]] = []
        self._manager: Any = None
        self._last_step: int | None = None
        self._teacher_scores: dict[str, float] | None = None
        self._teacher_scored = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the module and load every task once, so that a bad task fails before
        training."""
        if stage != "fit":
            return
        if not isinstance(pl_module, EvaluatedModule) or pl_module.tokenizer is None:
            raise TypeError(
                f"{_FIELD} needs a LightningModule with .student, .teacher and a .tokenizer (e.g. "
                f"lrkd.module.DistillationModule with a teacher given by name), not "
                f"{type(pl_module).__name__}"
            )
        from transformers import PreTrainedModel

        if not isinstance(pl_module.student, (PreTrainedModel, Materializable)):
            raise TypeError(
                f"{_FIELD} evaluates Hugging Face models; the student is a "
                f"{type(pl_module.student).__name__}. Export it and use lrkd eval."
            )
        if self.teacher and not isinstance(pl_module.teacher, PreTrainedModel):
            raise TypeError(
                f"{_FIELD}.teacher=true needs a Hugging Face teacher; this one is a "
                f"{type(pl_module.teacher).__name__} (a teacher cache?). Score the teacher with "
                "lrkd eval --model TEACHER instead."
            )
        self._manager = task_manager(self.include_path, field=f"{_FIELD}.include_path")
        check_tasks(self.tasks, self._manager, field=f"{_FIELD}.tasks")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate before the first step (``at_fit_start``; not when resuming)."""
        if self.at_fit_start and trainer.global_step == 0:
            self.run(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Evaluate every ``every_n_steps`` optimizer steps."""
        n, step = self.every_n_steps, trainer.global_step
        if n and step > 0 and step % n == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate after the last step (``at_fit_end``)."""
        if self.at_fit_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Evaluate now (rank 0; every rank must call it) and log the scores at the current
        step. Returns the logged metrics (empty on other ranks)."""
        assert isinstance(pl_module, EvaluatedModule)
        step = trainer.global_step
        self._last_step = step
        models = {"": pl_module.student}
        # Decided alike on every rank: under FSDP2 each model is gathered by all ranks together.
        if self.teacher and not self._teacher_scored:
            models["_teacher"] = pl_module.teacher
            self._teacher_scored = True
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        for suffix, module in models.items():
            model = generation_model(module)  # every rank: FSDP2 gathers a full copy
            if trainer.is_global_zero:
                found = self._scores(trainer, model, pl_module)
                metrics |= {f"eval/{name}{suffix}": value for name, value in found.items()}
            del model
        if not trainer.is_global_zero:
            trainer.strategy.barrier("lrkd_lm_eval")
            return {}
        if "_teacher" in models:
            self._teacher_scores = {k: v for k, v in metrics.items() if k.endswith("_teacher")}
        metrics["eval/seconds"] = time.perf_counter() - start
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.append({"step": float(step), **metrics})
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items())
        log.info("lrkd: lm-eval at step %d: %s", step, shown)
        trainer.strategy.barrier("lrkd_lm_eval")
        return metrics

    def _scores(
        self, trainer: Trainer, model: nn.Module, pl_module: EvaluatedModule
    ) -> dict[str, float]:
        with _kept_state(model), trainer.precision_plugin.forward_context():
            results = evaluate(
                model, self.tasks, self._manager, self.settings, tokenizer=pl_module.tokenizer
            )
        return scores(results)

    def state_dict(self) -> dict[str, Any]:
        """The teacher's scores (evaluated once per run) and the last evaluated step."""
        return {"teacher_scores": self._teacher_scores, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed run does not score the teacher again)."""
        self._teacher_scores = state_dict.get("teacher_scores")
        self._teacher_scored = self._teacher_scores is not None
        self._last_step = state_dict.get("last_step")


@contextmanager
def _kept_state(model: nn.Module) -> Iterator[None]:
    """Restore every RNG (lm-eval seeds Python's, NumPy's and torch's) and ``model``'s
    train/eval modes (lm-eval calls ``model.eval()``) afterwards; no gradients inside."""
    import numpy as np

    modes = [(m, m.training) for m in model.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            for module, training in modes:
                module.train(training)
