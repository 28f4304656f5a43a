"""TwoStageKL: one divergence for the first part of training, another for the rest.

PACED's strongest schedule (arXiv 2603.11178) is forward KL on the teacher's responses first
(mode coverage), then reverse KL on the student's own rollouts (consolidation). The switch
point is not published, so it is a setting here: an optimizer step or a fraction of training.

The callback drives a module with an ``objective`` (:class:`lrkd.objective.DistillationObjective`:
the divergence and its temperature, ``set_divergence``) and an ``on_policy`` sampler
(:class:`lrkd.generation.on_policy.OnPolicySampler`: the share of on-policy batches,
``set_fraction``), as :class:`lrkd.module.DistillationModule` has; at the switch it can also
scale the learning rate. The on-policy step itself (sampling, masking, scoring) is the
sampler's.

The stage is a function of the global step alone: steps ``0 .. switch_step - 1`` are stage 1,
``switch_step`` onwards stage 2, and all micro-batches of one optimizer step are in the same
stage. Every rank computes the same stage. The resolved switch step and the current stage are
saved in checkpoints, so a run resumed in either stage continues in it and switches at the same
step. The learning rate is scaled only on the way from stage 1 to stage 2, never on resuming in
stage 2: the optimizer and scheduler states restored from the checkpoint already carry it.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lrkd.generation.on_policy import OnPolicySampler
from lrkd.losses import DIVERGENCE_KINDS, DivergenceKind
from lrkd.objective import DistillationObjective

log = logging.getLogger("lrkd")

__all__ = ["StagedModule", "TwoStageKL"]


@runtime_checkable
class StagedModule(Protocol):
    """What TwoStageKL drives: a LightningModule with these two members."""

    objective: DistillationObjective
    on_policy: OnPolicySampler


class TwoStageKL(Callback):
    """Forward KL on teacher data first, then reverse KL on the student's own rollouts.

    Give exactly one of ``switch_step`` and ``switch_fraction``. Logs ``train/stage`` (1 or 2)
    every step, and at each stage entry an INFO line and a TensorBoard text note
    (``two_stage/switch``) with the settings that took effect.

    Args:
        switch_step: the first optimizer step (``trainer.global_step``) of stage 2.
        switch_fraction: stage 2 starts at ``round(switch_fraction * total steps)``, where the
            total is ``trainer.estimated_stepping_batches`` (from ``max_steps``, or
            ``max_epochs`` and the dataloader length) when training starts.
        first_divergence: divergence of stage 1: forward_kl, reverse_kl, jsd, skew_forward_kl,
            skew_reverse_kl or tvd (with the module's jsd_beta and skew_alpha).
        second_divergence: divergence of stage 2.
        first_on_policy_fraction: share of stage-1 batches that use the student's own
            completions (0: all teacher-forced on the data's responses).
        second_on_policy_fraction: share of stage-2 batches that use the student's own
            completions (1: fully on-policy; GKD's lambda in between).
        second_temperature: divergence temperature from the switch on; ``None`` keeps the
            module's ``temperature``.
        second_lr_scale: multiply the learning rate at the switch (every parameter group's
            current and initial lr, and the ``base_lrs`` of the schedulers, so that schedules
            continue from the scaled value); 1 leaves it alone.
    """

    def __init__(
        self,
        switch_step: int | None = None,
        switch_fraction: float | None = None,
        first_divergence: DivergenceKind = "forward_kl",
        second_divergence: DivergenceKind = "reverse_kl",
        first_on_policy_fraction: float = 0.0,
        second_on_policy_fraction: float = 1.0,
        second_temperature: float | None = None,
        second_lr_scale: float = 1.0,
    ) -> None:
        if (switch_step is None) == (switch_fraction is None):
            raise ValueError(
                "TwoStageKL: give exactly one of switch_step (an optimizer step) and "
                f"switch_fraction (a share of training); got switch_step={switch_step}, "
                f"switch_fraction={switch_fraction}."
            )
        if switch_step is not None and switch_step < 0:
            raise ValueError(f"TwoStageKL: switch_step={switch_step} must be >= 0.")
        if switch_fraction is not None and not 0.0 <= switch_fraction <= 1.0:
            raise ValueError(f"TwoStageKL: switch_fraction={switch_fraction} must be in [0, 1].")
        for name, kind in (("first", first_divergence), ("second", second_divergence)):
            if kind not in DIVERGENCE_KINDS:
                raise ValueError(
                    f"TwoStageKL: {name}_divergence={kind!r}; choose one of "
                    f"{', '.join(DIVERGENCE_KINDS)}."
                )
        for name, share in (
            ("first", first_on_policy_fraction), ("second", second_on_policy_fraction)
        ):  # fmt: skip
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"TwoStageKL: {name}_on_policy_fraction={share} is not in [0, 1].")
        if second_temperature is not None and second_temperature <= 0:
            raise ValueError(f"TwoStageKL: second_temperature={second_temperature} must be > 0.")
        if second_lr_scale <= 0:
            raise ValueError(f"TwoStageKL: second_lr_scale={second_lr_scale} must be > 0.")
        self.switch_fraction = switch_fraction
        self.switch_step = switch_step
        self.divergence = {1: first_divergence, 2: second_divergence}
        self.on_policy_fraction = {1: first_on_policy_fraction, 2: second_on_policy_fraction}
        self.second_temperature = second_temperature
        self.second_lr_scale = second_lr_scale
        self.stage = 0  # 0: not started; restored from a checkpoint otherwise

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return "TwoStageKL"

    def state_dict(self) -> dict[str, Any]:
        return {"switch_step": self.switch_step, "stage": self.stage}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restored = state_dict.get("switch_step")
        if self.switch_fraction is None and restored != self.switch_step:
            log.warning(
                "lrkd: TwoStageKL switch_step=%s in the config, %s in the checkpoint; using the "
                "config's.", self.switch_step, restored,
            )  # fmt: skip
        else:
            self.switch_step = restored
        self.stage = int(state_dict.get("stage", 0))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, StagedModule):
            raise TypeError(
                "TwoStageKL drives a module with an objective and an on_policy sampler (e.g. "
                f"lrkd.module.DistillationModule), not {type(pl_module).__name__}."
            )
        try:  # refused now rather than at the switch (e.g. by a teacher cache)
            for fraction in self.on_policy_fraction.values():
                pl_module.on_policy.check_fraction(fraction)
            pl_module.objective.check_temperature(self.second_temperature)
        except ValueError as err:
            raise ValueError(f"TwoStageKL: {err}") from err

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.switch_step is None:
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                raise ValueError(
                    "TwoStageKL: switch_fraction needs a known training length; set "
                    "trainer.max_steps or trainer.max_epochs, or use switch_step."
                )
            self.switch_step = round(self.switch_fraction * int(total))  # type: ignore[operator]
            log.info("lrkd: TwoStageKL switches at step %d of %d", self.switch_step, int(total))
        elif self.switch_step >= trainer.estimated_stepping_batches:
            raise ValueError(
                f"TwoStageKL: switch_step={self.switch_step}, but the run has only "
                f"{trainer.estimated_stepping_batches} optimizer steps (trainer.max_steps="
                f"{trainer.max_steps}), so stage 2 would never run; set switch_step below it "
                "(or use switch_fraction)."
            )
        self._enter(trainer, pl_module, self._stage_at(trainer.global_step))

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        stage = self._stage_at(trainer.global_step)
        if stage != self.stage:
            self._enter(trainer, pl_module, stage)
        pl_module.log("train/stage", float(stage), on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ switching
    def _stage_at(self, step: int) -> int:
        return 1 if step < self.switch_step else 2  # type: ignore[operator]

    def _enter(self, trainer: Trainer, pl_module: LightningModule, stage: int) -> None:
        """Apply a stage's settings. Called at every start (fresh or resumed) and at the switch;
        the learning rate changes only when stage 2 is entered from an earlier stage."""
        pl_module.objective.set_divergence(
            self.divergence[stage], self.second_temperature if stage == 2 else None
        )
        pl_module.on_policy.set_fraction(self.on_policy_fraction[stage])
        if self.stage == stage:  # resumed in the stage it was saved in: nothing new to do
            return
        if stage == 2 and self.second_lr_scale != 1.0:
            _scale_learning_rate(trainer, self.second_lr_scale)
        self.stage = stage
        temperature = pl_module.objective.divergence.temperature
        note = (
            f"stage {stage} from step {trainer.global_step}: divergence {self.divergence[stage]} "
            f"at temperature {temperature:g}, on-policy fraction {self.on_policy_fraction[stage]:g}"
        )
        if stage == 2 and self.second_lr_scale != 1.0:
            note += f", learning rate x{self.second_lr_scale:g}"
        log.info("lrkd: TwoStageKL %s", note)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(
                    "two_stage/switch", note, global_step=trainer.global_step
                )


def _scale_learning_rate(trainer: Trainer, scale: float) -> None:
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= scale
            if "initial_lr" in group:
                group["initial_lr"] *= scale
    for config in trainer.lr_scheduler_configs:
        base_lrs = getattr(config.scheduler, "base_lrs", None)
        if base_lrs is not None:
            config.scheduler.base_lrs = [lr * scale for lr in base_lrs]
