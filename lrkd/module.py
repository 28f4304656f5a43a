"""DistillationModule: a frozen teacher, a trainable student, and the training step.

The module holds the two models, the step, logging and the optimizer. The loss terms come from
:class:`lrkd.objective.DistillationObjective`, both models' outputs from
:func:`lrkd.models.paired_forward.run_pair`, and on-policy batches from
:class:`lrkd.generation.on_policy.OnPolicySampler`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, fields, is_dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lrkd._compat import attached_trainer, instantiated_by_cli
from lrkd.assembly import (
    build_student,
    cached_teacher,
    check_pair,
    enable_activation_checkpointing,
    token_setting,
)
from lrkd.data.teacher_cache import COLUMNS
from lrkd.data.tokens import teacher_view
from lrkd.distributed import is_sharded, local_numel, mixed_precision_policy, shard_fsdp2
from lrkd.generation.on_policy import OnPolicy, OnPolicySampler, response_stats
from lrkd.losses import TopKTeacher
from lrkd.models.paired_forward import PairedOutput, run_pair, supports_hidden_path
from lrkd.models.protocols import CoRunStudent, GradFlushing
from lrkd.models.students import StudentBuilder, model_logits
from lrkd.models.teachers import check_teacher_dtype, exclude_from_state_dict, frozen_teacher
from lrkd.objective import DistillationObjective, Loss, Targets, shared_vocab_size

log = logging.getLogger("lrkd")


#: Arguments of earlier versions -> their place in a setting block now (``lrkd fit`` names
#: them when an old config uses one).
RENAMED: dict[str, str] = {
    **{name: f"loss.{name}" for name in (f.name for f in fields(Loss))},
    **{f"on_policy_{name}": f"on_policy.{name}" for name in ("fraction", "max_new_tokens",
                                                            "temperature", "top_p", "seed")},
    "eos_token_id": "on_policy.eos_token_id",
}  # fmt: skip


class DistillationModule(LightningModule):
    """Distil a frozen teacher into a trainable student.

    Each step runs the teacher (no grad, eval mode) and the student on the batch and minimises
    ``kd_weight * D + ce_weight * CE + clone_weight * clone`` on the target tokens the batch's
    ``loss_mask`` selects, each example's divergence multiplied by its ``weight`` (PACED); see
    :mod:`lrkd.objective` for the terms, the batch format and a teacher prompt of its own
    (``teacher_*`` keys). A share ``on_policy.fraction`` of the training batches is replaced by
    the student's own completions of their prompts, scored by both models (GKD;
    :class:`lrkd.generation.on_policy.OnPolicySampler`); with ``loss.divergence: reverse_kl``
    that is on-policy reverse KL, and :class:`lrkd.callbacks.two_stage.TwoStageKL` switches to
    it partway through training.

    The teacher's weights are not stored in checkpoints (they are reloaded from ``teacher``).

    With ``teacher_cache`` the teacher never runs, nor is loaded: its top-k next-token
    distribution comes with each batch from a teacher cache (``lrkd cache-teacher``), and the
    divergence is taken against it plus a tail bucket (:func:`lrkd.losses.top_k_kd_divergence`).

    Args:
        teacher: the frozen teacher: a built-in name (``smollm2-135m-instruct``), a local
            Hugging Face model directory, a hub id, or any causal LM ``nn.Module`` by
            ``class_path``. With ``teacher_cache``: leave it out, or give the cache's teacher
            by name (checked).
        student: the trainable student: any causal LM ``nn.Module`` by ``class_path``, or a
            ``StudentBuilder`` (e.g. ``lrkd.models.students.FromTeacherConfig``) that is called
            with the teacher.
        loss: the divergence, its temperature and the term weights
            (:class:`~lrkd.objective.Loss`: ``divergence``, ``temperature``,
            ``scale_by_temperature_squared``, ``kd_weight``, ``ce_weight``, ``clone_weight``,
            ``jsd_beta``, ``skew_alpha``, ``chunk_size``, ``vocab_size``).
        on_policy: the student's own completions as training data
            (:class:`~lrkd.generation.on_policy.OnPolicy`: ``fraction``, ``max_new_tokens``,
            ``temperature``, ``top_p``, ``seed``, ``eos_token_id``).
        teacher_dtype: dtype of the teacher's weights: ``float32``, ``bfloat16``, ``float16``,
            or ``auto``: bfloat16 where the hardware runs it fast (a GPU that supports it, or a
            CPU whose bf16 matmul measured clearly faster than fp32: :mod:`lrkd.hardware`),
            else float32; a teacher given as a module keeps its dtype.
        teacher_cache: a teacher cache directory (``lrkd cache-teacher``) to take the teacher's
            distribution from instead of running it; ``lrkd fit`` reads the data from it too
            (``data.prepared``). It must have been made at ``loss.temperature``; the student
            must not need the teacher's weights (not a Low-Rank Clone) and training must be
            off-policy (``on_policy.fraction: 0``). See docs/data.md, "Teacher cache".
        activation_checkpointing: recompute each student decoder layer (for a low-rank clone,
            each (teacher layer, student layer) pair) in backward instead of storing its
            activations: less memory for about one more forward of compute.
        fused_head: take the training divergence and CE from the models' final hidden states
            and LM heads a few tokens at a time (``lrkd.losses.head_kd_losses``), never making
            the full [tokens, V] logits of either model: ``None`` does so on a CUDA device
            when the models allow it (a LowRankClone, or Hugging Face causal LMs with a plain
            head, not FSDP2-sharded), ``true`` always (an error if they do not), ``false``
            never. Validation always uses the logits.
        optimizer: optimizer for the student's trainable parameters (default AdamW, lr 1e-3).
        lr_scheduler: optional learning-rate scheduler, stepped every optimizer step.
    """

    def __init__(
        self,
        teacher: str | nn.Module | None = None,
        student: nn.Module | StudentBuilder | None = None,
        loss: Loss = Loss(),
        on_policy: OnPolicy = OnPolicy(),
        teacher_dtype: str = "auto",
        teacher_cache: str | None = None,
        activation_checkpointing: bool = False,
        fused_head: bool | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if isinstance(loss, dict):  # the saved hyperparameters of a module built in Python
            loss = Loss(**loss)
        if isinstance(on_policy, dict):
            on_policy = OnPolicy(**on_policy)
        check_teacher_dtype(teacher_dtype)
        # Settings are checked before the models are loaded (a bad value fails in a second).
        self.objective = DistillationObjective(loss)
        self.on_policy = OnPolicySampler(on_policy)
        # Under LightningCLI the hyperparameters are the config (class paths and arguments), so
        # a checkpoint records how to rebuild the student (``lrkd export`` relies on it).
        # Built in Python, the objects themselves are not worth saving.
        objects = [] if instantiated_by_cli() else ["student", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(
            ignore=objects + ([] if teacher is None or isinstance(teacher, str) else ["teacher"])
        )
        for block in ("loss", "on_policy"):  # plain values: loadable with weights_only=True
            if is_dataclass(self.hparams.get(block)):
                self.hparams[block] = asdict(self.hparams[block])
        self.fused_head = fused_head
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

        if student is None:
            raise ValueError("model.student is not set: give a student by class_path or a "
                             "builder such as lrkd.models.students.FromTeacherConfig.")  # fmt: skip
        self.teacher_cache = teacher_cache
        if teacher_cache is not None:
            self.teacher, self.tokenizer, info = cached_teacher(
                teacher, teacher_cache, loss.temperature
            )
            self.objective.fixed_temperature = (info.temperature, "model.teacher_cache")
            self.on_policy.refuse(
                "model.teacher_cache holds no teacher to score the student's own completions; "
                "set model.on_policy.fraction: 0 (and no on-policy stage), or distil online"
            )
            if fused_head:
                raise ValueError("model.fused_head=true needs the teacher's hidden states; with "
                                 "model.teacher_cache set fused_head: null or false.")  # fmt: skip
            if loss.kd_reduction == "batchmean":
                raise ValueError("model.loss.kd_reduction=batchmean counts each row's last "
                                 "position, which model.teacher_cache does not hold; use "
                                 "token_mean.")  # fmt: skip
        elif teacher is None:
            raise ValueError(
                "model.teacher is not set: give the teacher (a built-in name such as "
                "smollm2-135m-instruct, a model directory or a hub id), or model.teacher_cache."
            )
        else:
            self.teacher, self.tokenizer = frozen_teacher(teacher, teacher_dtype)
        # The frozen teacher's weights are reloaded from ``teacher``, never saved: its keys are
        # left out of this module's state_dict (so of every checkpoint, full or sharded) and
        # not expected when loading one.
        exclude_from_state_dict(self, ("teacher",))
        self.student = build_student(student, self.teacher, self.tokenizer)
        for model in (self.teacher, self.student):
            if getattr(getattr(model, "config", None), "use_cache", None):
                model.config.use_cache = False  # no KV cache while training
        if activation_checkpointing:
            enable_activation_checkpointing(self.student)
        tokenizer_size = len(self.tokenizer) if self.tokenizer is not None else None
        self.objective.shared_vocab = shared_vocab_size(
            self.teacher, self.student, loss.vocab_size, tokenizer_size
        )
        check_pair(self.teacher, self.student, loss.clone_weight)
        eos = token_setting(self.tokenizer, self.teacher, "eos_token_id")
        pad = token_setting(self.tokenizer, self.teacher, "pad_token_id")
        self.on_policy.set_tokens(eos if on_policy.eos_token_id is None else None, pad)

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
        if not self.training or self.fused_head is False or self.teacher_cache is not None:
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
        if self.teacher_cache is not None:
            return self._cached_loss(batch)
        view = teacher_view(batch)
        teacher_inputs = None if view is None else (view["input_ids"], view.get("attention_mask"))
        out = run_pair(
            self.teacher, self.student, batch["input_ids"], batch.get("attention_mask"),
            teacher_inputs, hidden=self.uses_fused_head(),
        )  # fmt: skip
        return self.objective(
            out, Targets.of(batch), batch.get("weight"), teacher_reference=not self.training
        )

    def _cached_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss terms against the teacher cache's distribution that the batch carries."""
        missing = [key for key in COLUMNS if key not in batch]
        if missing:
            raise ValueError(
                f"model.teacher_cache is set, but the batch has no {', '.join(missing)}: the "
                f"data must come from the cache: data.prepared: {self.teacher_cache} (lrkd fit "
                "sets it when data.prepared and data.train_files are left out)"
            )
        student_logits = model_logits(self.student, batch["input_ids"], batch.get("attention_mask"))
        top_k = TopKTeacher(*(batch[key] for key in COLUMNS))
        out = PairedOutput(student_logits=student_logits, teacher_top_k=top_k)
        return self.objective(out, Targets.of(batch), batch.get("weight"))

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
            why = ("FSDP2 gathers the teacher inside the forward" if sharded else
                   "DDP synchronises the projections' gradients")  # fmt: skip
            log.info("lrkd: %d process(es): the student generates its weights in the autograd "
                     "graph (cache_weights off) so that %s", trainer.world_size, why)  # fmt: skip

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
        try:
            optimizer = self.optimizer(params)
        except ValueError as err:  # torch's own checks: "Invalid learning rate: -0.001", ...
            raise ValueError(f"model.optimizer: {err}; fix model.optimizer.init_args.") from err
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
