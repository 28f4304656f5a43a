"""DistillationModule: a frozen teacher, a trainable student, and the training step.

The module holds the two models, the step, logging and the optimizer. The loss terms come from
:class:`lrkd.objective.DistillationObjective`, both models' outputs from
:func:`lrkd.models.paired_forward.run_pair`, and on-policy batches from
:class:`lrkd.generation.on_policy.OnPolicySampler`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lrkd._compat import attached_trainer, instantiated_by_cli
from lrkd.data.probe import probe_batch
from lrkd.data.text import teacher_view
from lrkd.distributed import is_sharded, local_numel, mixed_precision_policy, shard_fsdp2
from lrkd.generation.on_policy import OnPolicySampler, response_stats
from lrkd.models.paired_forward import run_pair, supports_hidden_path
from lrkd.models.protocols import ActivationCheckpointing, CoRunStudent, GradFlushing
from lrkd.models.students import StudentBuilder, model_logits
from lrkd.models.teachers import (
    check_teacher_dtype,
    exclude_from_state_dict,
    frozen_teacher,
    load_tokenizer,
)
from lrkd.objective import DistillationObjective, Targets, shared_vocab_size

log = logging.getLogger("lrkd")


class DistillationModule(LightningModule):
    """Distil a frozen teacher into a trainable student.

    Each step runs the teacher (no grad, eval mode) and the student on the batch and minimises
    ``kd_weight * D + ce_weight * CE + clone_weight * clone`` on the target tokens the batch's
    ``loss_mask`` selects, each example's divergence multiplied by its ``weight`` (PACED); see
    :mod:`lrkd.objective` for the terms, the batch format and a teacher prompt of its own
    (``teacher_*`` keys). A share ``on_policy_fraction`` of the training batches is replaced by
    the student's own completions of their prompts, scored by both models (GKD;
    :class:`lrkd.generation.on_policy.OnPolicySampler`); with ``divergence: reverse_kl`` that is
    on-policy reverse KL, and :class:`lrkd.callbacks.two_stage.TwoStageKL` switches to it
    partway through training.

    The teacher's weights are not stored in checkpoints (they are reloaded from ``teacher``).

    Args:
        teacher: the frozen teacher: a built-in name (``smollm2-135m-instruct``), a local
            Hugging Face model directory, a hub id, or any causal LM ``nn.Module`` by
            ``class_path``.
        student: the trainable student: any causal LM ``nn.Module`` by ``class_path``, or a
            ``StudentBuilder`` (e.g. ``lrkd.models.students.FromTeacherConfig``) that is called
            with the teacher.
        divergence: which divergence between teacher and student token distributions:
            ``forward_kl`` (KL(teacher||student)), ``reverse_kl`` (KL(student||teacher)),
            ``jsd`` (generalised, see ``jsd_beta``), ``skew_forward_kl``, ``skew_reverse_kl``
            (see ``skew_alpha``) or ``tvd``.
        temperature: both models' logits are divided by it before the divergence.
        scale_by_temperature_squared: multiply the divergence by T^2 (Hinton et al.), which
            keeps gradient magnitudes comparable across temperatures.
        kd_weight: weight of the divergence term.
        ce_weight: weight of the student's next-token cross-entropy on the data (0 disables).
        clone_weight: weight alpha of the activation clone loss, for a student that runs
            alongside the teacher and reports one (``lrkd.models.lowrank.LowRankClone``); its
            terms are chosen on the student (``clone_terms``). 0 disables it.
        jsd_beta: mixture weight of the teacher in ``jsd``; 0 is forward KL, 1 reverse KL.
        skew_alpha: skew of the ``skew_*`` divergences.
        chunk_size: tokens per chunk in the loss; ``None`` picks about 64 MB per fp32 chunk.
        vocab_size: the number of real tokens; when teacher and student heads differ in size
            only by padding rows, the logits are cut to the shared size. ``None`` uses the
            teacher tokenizer's length when the teacher is loaded by name.
        teacher_dtype: dtype of the teacher's weights: ``float32``, ``bfloat16``, ``float16``,
            or ``auto`` (bfloat16 on a GPU that supports it, else float32).
        activation_checkpointing: recompute each student decoder layer (for a low-rank clone,
            each (teacher layer, student layer) pair) in backward instead of storing its
            activations: less memory for about one more forward of compute.
        fused_head: take the training divergence and CE from the models' final hidden states
            and LM heads a few tokens at a time (``lrkd.losses.head_kd_losses``), never making
            the full [tokens, V] logits of either model: ``None`` does so on a CUDA device
            when the models allow it (a LowRankClone, or Hugging Face causal LMs with a plain
            head, not FSDP2-sharded), ``true`` always (an error if they do not), ``false``
            never. Validation always uses the logits.
        on_policy_fraction: share of training batches on which the student's own completions
            replace the data's responses (GKD's lambda): 0 never (plain distillation), 1 always.
            Which batches are on-policy is a fixed function of ``on_policy_seed`` and the step,
            the same on every rank and after resuming.
        on_policy_max_new_tokens: the longest completion the student samples on an on-policy
            step.
        on_policy_temperature: sampling temperature of those completions (0 is greedy). 1
            samples from the student's own distribution, which is what on-policy reverse KL
            assumes.
        on_policy_top_p: nucleus sampling threshold of those completions (1 disables it).
        on_policy_seed: seed of the on-policy sampling and of the choice of on-policy batches.
        eos_token_id: the token id(s) that end a sampled completion; ``None`` takes the
            tokenizer's EOS (the teacher's, else the DataModule's), else the teacher config's.
        optimizer: optimizer for the student's trainable parameters (default AdamW, lr 1e-3).
        lr_scheduler: optional learning-rate scheduler, stepped every optimizer step.
    """

    def __init__(
        self,
        teacher: str | nn.Module,
        student: nn.Module | StudentBuilder,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        scale_by_temperature_squared: bool = False,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        clone_weight: float = 0.0,
        jsd_beta: float = 0.5,
        skew_alpha: float = 0.1,
        chunk_size: int | None = None,
        vocab_size: int | None = None,
        teacher_dtype: str = "auto",
        activation_checkpointing: bool = False,
        fused_head: bool | None = None,
        on_policy_fraction: float = 0.0,
        on_policy_max_new_tokens: int = 64,
        on_policy_temperature: float = 1.0,
        on_policy_top_p: float = 1.0,
        on_policy_seed: int = 0,
        eos_token_id: int | list[int] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_teacher_dtype(teacher_dtype)
        # Settings are checked before the models are loaded (a bad value fails in a second).
        self.objective = DistillationObjective(
            divergence, temperature, scale_by_temperature_squared, kd_weight, ce_weight,
            clone_weight, jsd_beta, skew_alpha, chunk_size,
        )  # fmt: skip
        self.on_policy = OnPolicySampler(
            on_policy_fraction, on_policy_max_new_tokens, on_policy_temperature, on_policy_top_p,
            on_policy_seed,
        )  # fmt: skip
        # Under LightningCLI the hyperparameters are the config (class paths and arguments), so
        # a checkpoint records how to rebuild the student (``lrkd export`` relies on it).
        # Built in Python, the objects themselves are not worth saving.
        objects = [] if instantiated_by_cli() else ["student", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(
            ignore=objects + ([] if isinstance(teacher, str) else ["teacher"])
        )
        self.fused_head = fused_head
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

        self.teacher, self.tokenizer = frozen_teacher(teacher, teacher_dtype)
        # The frozen teacher's weights are reloaded from ``teacher``, never saved: its keys are
        # left out of this module's state_dict (so of every checkpoint, full or sharded) and
        # not expected when loading one.
        exclude_from_state_dict(self, ("teacher",))
        self.student = _build_student(student, self.teacher, self.tokenizer)
        for model in (self.teacher, self.student):
            if getattr(getattr(model, "config", None), "use_cache", None):
                model.config.use_cache = False  # no KV cache while training
        if activation_checkpointing:
            _enable_activation_checkpointing(self.student)
        tokenizer_size = len(self.tokenizer) if self.tokenizer is not None else None
        self.objective.shared_vocab = shared_vocab_size(
            self.teacher, self.student, vocab_size, tokenizer_size
        )
        self._check_student(clone_weight)
        eos = eos_token_id if eos_token_id is not None else self._token_setting("eos_token_id")
        self.on_policy.set_tokens(eos, self._token_setting("pad_token_id"))

    def _check_student(self, clone_weight: float) -> None:
        co_run = isinstance(self.student, CoRunStudent)
        if clone_weight and not co_run:
            raise ValueError(
                f"model.clone_weight={clone_weight}, but the student "
                f"({type(self.student).__name__}) has no activation clone loss; use "
                "lrkd.models.lowrank.LowRankCloneBuilder or set clone_weight: 0."
            )
        if co_run and self.student.teacher is not self.teacher:
            raise ValueError(
                "model.student runs alongside a teacher that is not model.teacher; build it with "
                "a StudentBuilder (e.g. LowRankCloneBuilder) so both share one frozen teacher."
            )

    def _token_setting(self, name: str) -> Any:
        """``eos_token_id`` / ``pad_token_id`` from the first source that names one: the
        teacher's tokenizer, its generation config, its config."""
        sources = (
            self.tokenizer,
            getattr(self.teacher, "generation_config", None),
            getattr(self.teacher, "config", None),
        )
        for source in sources:
            value = getattr(source, name, None)
            if value is not None:
                return value
        return None

    def train(self, mode: bool = True) -> DistillationModule:
        """Set train/eval mode for the student; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The student's logits [B, L, V] for ``input_ids``."""
        return model_logits(self.student, input_ids, attention_mask)

    def uses_fused_head(self) -> bool:
        """Whether this step takes the divergence and CE from hidden states and heads
        (``fused_head``): training steps only; ``None`` means on a CUDA device when supported."""
        if not self.training or self.fused_head is False:
            return False
        supported = supports_hidden_path(self.teacher, self.student) and (
            isinstance(self.student, CoRunStudent) or not is_sharded(self.student)
        )
        if self.fused_head and not supported:
            raise ValueError(
                "model.fused_head=true needs a LowRankClone student, or teacher and student that "
                "are Hugging Face causal LMs with a final norm (.model.norm) and a bias-free LM "
                "head, not sharded by FSDP2; set fused_head: null or false."
            )
        return supported and (self.fused_head or self.device.type == "cuda")

    def distillation_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss and its terms for one batch (:class:`lrkd.objective.DistillationObjective`):
        ``loss``, ``kd``, ``ce``, clone terms, and in eval mode ``ce_teacher``."""
        view = teacher_view(batch)
        teacher_inputs = None if view is None else (view["input_ids"], view.get("attention_mask"))
        out = run_pair(
            self.teacher, self.student, batch["input_ids"], batch.get("attention_mask"),
            teacher_inputs, hidden=self.uses_fused_head(),
        )  # fmt: skip
        return self.objective(
            out, Targets.of(batch), batch.get("weight"), teacher_reference=not self.training
        )

    def _log_terms(self, stage: str, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        on_step = stage == "train"
        sync = stage != "train"
        self.log(
            f"{stage}/loss", terms["loss"], prog_bar=True, on_step=on_step, on_epoch=not on_step,
            batch_size=batch_size, sync_dist=sync,
        )  # fmt: skip
        # Training logs one ``kd`` curve whatever the divergence (it may change mid-run, and
        # Lightning re-logs a step key that stopped being logged); evaluation names it.
        kd_name = "kd" if stage == "train" else f"kd_{self.objective.divergence.kind}"
        names = {"kd": kd_name, "ce": "ce", "ce_teacher": "ce_teacher"}
        names.update({k: k for k in terms if k.startswith("clone")})
        for key in sorted(terms.keys() & names.keys()):
            self.log(
                f"{stage}/{names[key]}", terms[key], on_step=on_step, on_epoch=not on_step,
                batch_size=batch_size, sync_dist=sync,
            )  # fmt: skip

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One distillation step on a training batch (on the student's own completions of its
        prompts when the step is on-policy); logs ``train/*``."""
        on_policy = self.on_policy.is_on_policy(self.global_step, batch_idx)
        if on_policy:
            batch = self.on_policy.batch(
                self.student, batch, self.global_step, batch_idx, self.global_rank, self.device
            )
        terms = self.distillation_loss(batch)
        batch_size = batch["input_ids"].shape[0]
        self._log_terms("train", terms, batch_size)
        if self.on_policy.ever_enabled:  # every step from then on: Lightning re-logs stale keys
            stats = response_stats(batch, self.on_policy.eos_token_ids)
            self.log_dict({"train/on_policy": float(on_policy), **stats}, on_step=True,
                          batch_size=batch_size)  # fmt: skip
        return terms["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Loss terms on a validation batch; logs ``val/*`` epoch means."""
        terms = self.distillation_loss(batch)
        self._log_terms("val", terms, batch["input_ids"].shape[0])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Loss terms on a test batch; logs ``test/*`` epoch means."""
        terms = self.distillation_loss(batch)
        self._log_terms("test", terms, batch["input_ids"].shape[0])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The student's greedy next-token prediction at every position."""
        return self(batch["input_ids"], batch.get("attention_mask")).argmax(dim=-1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn a weight-generating student's accumulated gradients into its parameters'
        gradients (once per optimizer step, after all micro-batches)."""
        if isinstance(self.student, GradFlushing):
            self.student.flush_weight_grads()

    def setup(self, stage: str) -> None:
        """Refuse fp16 mixed precision for weight-generating students (use bf16), and turn off
        their weight cache on several processes."""
        trainer = attached_trainer(self)
        precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
        caching = isinstance(self.student, GradFlushing) and self.student.cache_weights
        if caching and precision.startswith("16"):
            raise ValueError(
                f"trainer.precision={precision}: a student with cached generated weights "
                "(LowRankClone) does not support fp16 loss scaling; use bf16-mixed or 32."
            )
        sharded = isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)
        if caching and (trainer.world_size > 1 or sharded):
            # Cached weights turn into projection gradients after backward, where DDP's
            # gradient all-reduce never sees them, and are generated outside the forward,
            # where FSDP2 has not gathered the teacher; generated in the graph, the projections
            # get their gradients in backward like any parameter. The cost: weights are
            # generated per micro-batch rather than per optimizer step.
            self.student.cache_weights = False
            log.info("lrkd: %d processes: the student generates its weights in the autograd "
                     "graph (cache_weights off) so that DDP synchronises the projections' "
                     "gradients", trainer.world_size)  # fmt: skip

    def configure_model(self) -> None:
        """Under :class:`lrkd.distributed.FSDP2Strategy` (or Lightning's
        ``ModelParallelStrategy``), shard teacher and student with FSDP2: see
        :func:`lrkd.distributed.shard_fsdp2`. Other strategies need nothing here."""
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.student):
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "trainer.strategy: lrkd shards with FSDP2 only (no tensor parallelism); use "
                "lrkd.distributed.FSDP2Strategy, or ModelParallelStrategy with "
                "tensor_parallel_size: 1 and data_parallel_size: the number of ranks."
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        precision = str(getattr(attached_trainer(self), "precision", "32-true"))
        shard_fsdp2(self.teacher, self.student, dp_mesh, mixed_precision_policy(precision))
        log.info("lrkd: FSDP2 over %d ranks: this rank holds %d teacher and %d trainable "
                 "student parameters", dp_mesh.size(), local_numel(self.teacher),
                 local_numel(self.student, trainable=True))  # fmt: skip

    def configure_optimizers(self) -> Any:
        """The optimizer over the student's trainable parameters (never the teacher's)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer(params)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _enable_activation_checkpointing(student: nn.Module) -> None:
    if isinstance(student, ActivationCheckpointing):
        # Non-reentrant: works with frozen inputs, FSDP2 and torch.compile.
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        raise ValueError(
            f"model.activation_checkpointing: the student ({type(student).__name__}) has no "
            "gradient_checkpointing_enable(); checkpoint its layers in its own forward instead."
        )


def _build_student(
    student: nn.Module | StudentBuilder, teacher: nn.Module, tokenizer: Any
) -> nn.Module:
    """The student: ``student`` itself, or what the builder ``student`` builds for ``teacher``
    (called with the probe batch it requests, if any: :meth:`StudentBuilder.probe_request`).

    Args:
        student: a student module or a student builder.
        teacher: the frozen teacher.
        tokenizer: the teacher's tokenizer when the module loaded it, else ``None`` (then a
            requested probe is tokenised with the tokenizer of the teacher's ``name_or_path``).

    Returns:
        The student.

    Raises:
        ValueError: the builder requests a probe and no tokenizer can be found for the teacher.
    """
    if not isinstance(student, StudentBuilder):
        return student
    request = student.probe_request()
    if request is None:
        return student(teacher)
    texts, n_tokens = request
    if tokenizer is None:
        source = getattr(teacher, "name_or_path", None)
        try:
            if not source:
                raise ValueError("the teacher has no name_or_path")
            tokenizer = load_tokenizer(source, field="model.teacher")
        except (OSError, ValueError) as err:
            raise ValueError(
                f"model.student: {type(student).__name__} requests a probe batch (e.g. "
                "init: activation_pca) tokenised with the teacher's tokenizer, but none could "
                f"be loaded from the teacher's name_or_path {source!r} ({err}). Give "
                "model.teacher by name (a built-in name, model directory or hub id), or build "
                "the student in Python with probe_input_ids (LowRankClone(teacher, ..., "
                "probe_input_ids=lrkd.data.probe.probe_batch(tokenizer))), or use "
                "init: embedding_pca."
            ) from err
    return student(teacher, probe_input_ids=probe_batch(tokenizer, texts, n_tokens))
