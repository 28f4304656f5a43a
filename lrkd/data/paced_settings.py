"""The setting blocks of :class:`~lrkd.data.datamodule.DistillDataModule`, one per concern, so
a config reads in blocks::

    data:
      class_path: lrkd.data.datamodule.DistillDataModule
      init_args:
        teacher_responses: {source: auto, max_new_tokens: 32}
        rollouts: {num_samples: 4, max_new_tokens: 16}
        pacing: {weighting: paced, estimate_every_n_steps: 20}
        validation: {num_samples: 2}

:data:`RENAMED` maps each flat argument of earlier versions to its place in a block; ``lrkd
fit`` names them when an old config uses one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RENAMED", "Pacing", "Rollouts", "TeacherResponses", "Validation"]


@dataclass(frozen=True)
class TeacherResponses:
    """Where the training responses come from and how the teacher writes them.

    Attributes:
        source: ``dataset`` (each problem's ``response``), ``generate`` (the teacher answers
            every problem once; the result is cached) or ``auto`` (the dataset's where present,
            else generated).
        max_new_tokens: the longest generated teacher response.
        temperature: sampling temperature of teacher responses (0 is greedy).
        drop_incorrect: train only on problems whose teacher response the verifier accepts.
        cache_dir: where generated teacher responses are cached; ``None`` is
            ``$LRKD_CACHE_DIR/responses`` (default ``~/.cache/lrkd/responses``).
    """

    source: str = "auto"
    max_new_tokens: int = 64
    temperature: float = 0.0
    drop_incorrect: bool = False
    cache_dir: str | None = None


@dataclass(frozen=True)
class Rollouts:
    """The student's samples for a pass-rate estimate.

    Attributes:
        num_samples: samples per problem (K).
        temperature: sampling temperature.
        top_p: nucleus-sampling mass.
        max_new_tokens: the longest sampled answer.
        batch_size: sequences per generation forward pass.
        stop: stop strings or token ids: an answer ends where one first appears and is
            verified without it (e.g. ``["\\n\\n", "Question:"]``, so that a number in a
            question the model goes on to write is not read as its answer); also used for
            validation pass@1. lrkd's lm-eval problem tasks stop at ``["\\n\\n",
            "Question:"]`` with ``max_new_tokens: 64`` (docs/evaluate.md).
    """

    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 32
    stop: list[str | int] | None = None


@dataclass(frozen=True)
class Pacing:
    """How pass rates become weights, and when they are estimated.

    Attributes:
        weighting: ``paced`` (``w = p**alpha (1-p)**beta``), ``uniform`` or ``hard_filter``
            (1 for 0 < p < 1, else 0).
        alpha: exponent of p in the PACED weight.
        beta: exponent of 1 - p in the PACED weight.
        apply_weights: ``loss_weight`` (multiply each example's divergence by
            ``w / mean(w)``) or ``sampling`` (draw problems with probability ``w / sum(w)``).
        skip_zero_weight: in ``loss_weight`` mode, do not draw problems with w = 0.
        cold_start: when fewer than ``min_frontier`` problems have w > 0: ``uniform``,
            ``laplace`` (weights of the smoothed rate ``(c+1)/(K+2)``) or ``error``.
        min_frontier: the fewest problems with w > 0 for the weights to be used as they are.
        bucket_edges: interior pass-rate edges of the buckets.
        estimate_at_start: estimate pass rates before the first training step.
        estimate_every_n_epochs: re-estimate every this many epochs (``None`` or 0: never).
        estimate_every_n_steps: re-estimate every this many optimizer steps (``None`` or 0:
            never; on the command line write 0, or ``--data.pacing "{estimate_every_n_steps:
            null}"``: jsonargparse does not read ``null`` for a field of a block).
    """

    weighting: str = "paced"
    alpha: float = 1.0
    beta: float = 1.0
    apply_weights: str = "loss_weight"
    skip_zero_weight: bool = True
    cold_start: str = "uniform"
    min_frontier: int = 1
    bucket_edges: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    estimate_at_start: bool = True
    estimate_every_n_epochs: int | None = 1
    estimate_every_n_steps: int | None = None


@dataclass(frozen=True)
class Validation:
    """Pass rates on the held-out problems.

    Attributes:
        num_samples: samples per held-out problem for ``val/pass_rate`` (0 disables it;
            greedy ``val/pass@1`` is always reported).
        max_problems: evaluate on at most this many held-out problems.
    """

    num_samples: int = 4
    max_problems: int | None = None


_PACING_FIELDS = (
    "weighting", "alpha", "beta", "apply_weights", "skip_zero_weight", "cold_start",
    "min_frontier", "bucket_edges", "estimate_at_start", "estimate_every_n_epochs",
    "estimate_every_n_steps",
)  # fmt: skip

#: Flat DistillDataModule arguments of earlier versions -> their place now.
RENAMED: dict[str, str] = {
    "teacher_max_new_tokens": "teacher_responses.max_new_tokens",
    "teacher_temperature": "teacher_responses.temperature",
    "drop_incorrect_teacher_responses": "teacher_responses.drop_incorrect",
    "response_cache_dir": "teacher_responses.cache_dir",
    **{name: f"pacing.{name}" for name in _PACING_FIELDS},
    "num_rollouts": "rollouts.num_samples",
    "rollout_temperature": "rollouts.temperature",
    "rollout_top_p": "rollouts.top_p",
    "rollout_max_new_tokens": "rollouts.max_new_tokens",
    "rollout_batch_size": "rollouts.batch_size",
    "val_num_rollouts": "validation.num_samples",
    "val_max_problems": "validation.max_problems",
}
