"""DistillationModule: a frozen teacher, a trainable student, and the distillation loss."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lrkd._compat import attached_trainer, instantiated_by_cli
from lrkd.distributed import is_sharded, local_numel, mixed_precision_policy, shard_fsdp2
from lrkd.generation.on_policy import batch_prompts, completion_batch
from lrkd.generation.sampling import check_sampling, generate, generation_model
from lrkd.losses import DIVERGENCE_KINDS, KDDivergence, chunked_cross_entropy, head_kd_losses
from lrkd.models.protocols import ActivationCheckpointing, CoRunStudent, GradFlushing
from lrkd.models.students import StudentBuilder, model_logits, output_vocab_size
from lrkd.models.teachers import exclude_from_state_dict, freeze, load_teacher, load_tokenizer
from lrkd.seeds import row_seed

log = logging.getLogger("lrkd")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DistillationModule(LightningModule):
    """Distil a frozen teacher into a trainable student.

    Each step runs the teacher (no grad, eval mode) and the student on the same tokens and
    minimises ``kd_weight * D(teacher, student) + ce_weight * CE(student, next token)``, where D
    is the chosen divergence at ``temperature`` and both terms are taken on the positions the
    batch's ``loss_mask`` selects. An example's divergence is multiplied by its ``weight`` when
    the batch carries one (pass-rate pacing): the divergence term of a batch is
    ``sum_i w_i * sum_t D_it / sum_it mask_it``, so weights with mean 1 keep the scale of
    unweighted distillation (:class:`lrkd.data.datamodule.DistillDataModule` normalises them
    so).

    Batches are dicts with ``input_ids`` [B, L], ``attention_mask`` [B, L], ``loss_mask`` [B, L]
    (1 where the token is a training target, i.e. its prediction from the previous position
    counts) and optionally ``weight`` [B]. When the teacher sees a different prompt over the
    same responses (privileged context, ``data.teacher_prompt_template``), they also carry
    ``teacher_input_ids``, ``teacher_attention_mask`` and ``teacher_loss_mask`` [B, L_T]: the
    teacher runs on its own sequence and the divergence pairs the k-th target position of each
    row in both sequences (their target tokens must be equal; a LowRankClone, which co-runs
    the teacher on the student's tokens, refuses them).

    **On-policy steps** (GKD, Agarwal et al. 2024): a share ``on_policy_fraction`` of the
    training batches is replaced by the student's own completions of the batch's prompts (the
    tokens before each row's first target). The student samples one completion per prompt
    without gradients; teacher and student then score prompt + completion, and the divergence is
    taken on the generated tokens only (including the EOS the student wrote, never the prompt or
    the padding). Gradients flow through the student's scoring forward only, not through the
    sampling, as in GKD and TRL's GKDTrainer. The batch's ``weight`` (the PACED weight) still
    multiplies each row. With ``divergence: reverse_kl`` this is on-policy reverse KL;
    :class:`lrkd.callbacks.two_stage.TwoStageKL` switches to it partway through training.

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
        if divergence not in DIVERGENCE_KINDS:
            raise ValueError(
                f"model.divergence={divergence!r} is not a known divergence; "
                f"choose one of {', '.join(DIVERGENCE_KINDS)}."
            )
        try:
            self.kd_loss = KDDivergence(
                divergence, temperature, beta=jsd_beta, skew_alpha=skew_alpha, chunk_size=chunk_size
            )
        except ValueError as err:
            raise ValueError(
                f"model: {err} (see model.temperature, jsd_beta, skew_alpha)."
            ) from err
        _check_on_policy_fraction(on_policy_fraction)
        check_sampling(
            on_policy_max_new_tokens, on_policy_temperature, on_policy_top_p, "model.on_policy_"
        )
        if teacher_dtype not in (*_DTYPES, "auto"):
            raise ValueError(
                f"model.teacher_dtype={teacher_dtype!r}; choose auto, {', '.join(_DTYPES)}."
            )
        # Under LightningCLI the hyperparameters are the config (class paths and arguments), so
        # a checkpoint records how to rebuild the student (``lrkd export`` relies on it).
        # Built in Python, the objects themselves are not worth saving.
        objects = [] if instantiated_by_cli() else ["student", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(
            ignore=objects + ([] if isinstance(teacher, str) else ["teacher"])
        )
        self.scale_by_temperature_squared = scale_by_temperature_squared
        self.fused_head = fused_head
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight
        self.clone_weight = clone_weight
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.on_policy_fraction = on_policy_fraction
        self._on_policy_enabled = on_policy_fraction > 0
        self.on_policy_max_new_tokens = on_policy_max_new_tokens
        self.on_policy_temperature = on_policy_temperature
        self.on_policy_top_p = on_policy_top_p
        self.on_policy_seed = on_policy_seed
        self.eos_token_id = eos_token_id
        # The plain model a low-rank clone is multiplied out into for sampling, refilled in place
        # each on-policy step; set with object.__setattr__ so that it is not a submodule (no
        # parameters, state dict or device moves of its own).
        object.__setattr__(self, "_rollout_model", None)

        self.tokenizer: Any = None
        if isinstance(teacher, str):
            dtype = _DTYPES.get(teacher_dtype)
            if teacher_dtype == "auto":
                cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                dtype = torch.bfloat16 if cuda_bf16 else torch.float32
            teacher = load_teacher(teacher, dtype=dtype)
            self.tokenizer = load_tokenizer(self.hparams.teacher, field="model.teacher")
        elif teacher_dtype in _DTYPES:
            teacher = teacher.to(_DTYPES[teacher_dtype])
        self.teacher = freeze(teacher)
        # The frozen teacher's weights are reloaded from ``teacher``, never saved: its keys are
        # left out of this module's state_dict (so of every checkpoint, full or sharded) and
        # not expected when loading one.
        exclude_from_state_dict(self, ("teacher",))
        self.student = student(self.teacher) if isinstance(student, StudentBuilder) else student
        for model in (self.teacher, self.student):
            if getattr(getattr(model, "config", None), "use_cache", None):
                model.config.use_cache = False  # no KV cache while training
        if activation_checkpointing:
            _enable_activation_checkpointing(self.student)
        self.shared_vocab = self._check_vocab(vocab_size)
        self.co_run = isinstance(self.student, CoRunStudent)
        if clone_weight and not self.co_run:
            raise ValueError(
                f"model.clone_weight={clone_weight}, but the student "
                f"({type(self.student).__name__}) has no activation clone loss; use "
                "lrkd.models.lowrank.LowRankCloneBuilder or set clone_weight: 0."
            )
        if self.co_run and getattr(self.student, "teacher", None) is not self.teacher:
            raise ValueError(
                "model.student runs alongside a teacher that is not model.teacher; build it with "
                "a StudentBuilder (e.g. LowRankCloneBuilder) so both share one frozen teacher."
            )

    def _check_vocab(self, vocab_size: int | None) -> int | None:
        """Return the number of logits to keep, or None to keep all; fail on a real mismatch."""
        v_teacher = output_vocab_size(self.teacher)
        v_student = output_vocab_size(self.student)
        if v_teacher is None or v_student is None or v_teacher == v_student:
            return None
        n_tokens = vocab_size or (len(self.tokenizer) if self.tokenizer is not None else None)
        if n_tokens is not None and n_tokens <= min(v_teacher, v_student):
            log.warning(
                "lrkd: teacher has %d logits, student %d; the tokenizer has %d tokens, so the "
                "extra rows are padding and the loss uses the shared first %d.",
                v_teacher,
                v_student,
                n_tokens,
                min(v_teacher, v_student),
            )
            return min(v_teacher, v_student)
        known = f"the tokenizer has {n_tokens} tokens" if n_tokens else "no tokenizer size known"
        raise ValueError(
            f"Vocab mismatch: the teacher predicts {v_teacher} tokens and the student "
            f"{v_student} ({known}). The student must use the teacher's tokenizer: set "
            f"model.student's vocab_size to {v_teacher}. If the two differ only by padded "
            "embedding rows, set model.vocab_size to the real number of tokens."
        )

    def configure_callbacks(self) -> list[Callback]:
        """The DataModule's own training-loop callbacks (pass-rate pacing), when it has any."""
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        callbacks = getattr(datamodule, "training_callbacks", None)
        return list(callbacks()) if callable(callbacks) else []

    def set_divergence(self, kind: str, temperature: float | None = None) -> None:
        """Switch the divergence from the next batch on, at ``temperature`` (``None``: the
        module's ``temperature`` argument); the other divergence settings are kept. Used by
        :class:`~lrkd.callbacks.two_stage.TwoStageKL`."""
        old = self.kd_loss
        self.kd_loss = KDDivergence(
            kind,  # type: ignore[arg-type]
            self.hparams.temperature if temperature is None else temperature,
            beta=old.beta,
            skew_alpha=old.skew_alpha,
            chunk_size=old.chunk_size,
        )

    def set_on_policy_fraction(self, fraction: float) -> None:
        """Set the share of on-policy training batches from the next batch on."""
        _check_on_policy_fraction(fraction)
        self.on_policy_fraction = fraction
        self._on_policy_enabled |= fraction > 0

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

    def _vocab_aligned(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared_vocab is not None:
            student_logits = student_logits[..., : self.shared_vocab]
            teacher_logits = teacher_logits[..., : self.shared_vocab]
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(
                f"Vocab mismatch at run time: teacher logits have {teacher_logits.shape[-1]} "
                f"entries, student logits {student_logits.shape[-1]}. Set model.vocab_size to "
                "the real number of tokens if the difference is padding."
            )
        return student_logits, teacher_logits

    def distillation_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compute the loss and its terms for one batch.

        Returns:
            A dict with ``loss`` (to minimise), ``kd`` (the divergence term, before
            ``kd_weight``), ``ce`` (the student's next-token cross-entropy) and, in eval
            mode, ``ce_teacher`` (the teacher's, for reference).
        """
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        targets, mask = next_token_targets(batch)
        # The teacher's own view of the same responses (a privileged prompt), if the batch has
        # one: the divergence pairs the i-th target position of each row in both sequences.
        teacher_batch = teacher_view(batch)
        t_input_ids, t_attention_mask, t_targets, t_mask = input_ids, attention_mask, targets, mask
        rows = t_rows = None
        if teacher_batch is not None:
            if self.co_run:
                raise ValueError(
                    "A teacher prompt different from the student's (teacher_input_ids, e.g. "
                    "data.teacher_prompt_template) cannot be used with a LowRankClone student: "
                    "its clone loss pairs teacher and student activations on the same tokens."
                )
            t_input_ids = teacher_batch["input_ids"]
            t_attention_mask = teacher_batch.get("attention_mask")
            t_targets, t_mask = next_token_targets(teacher_batch)
            rows, t_rows = _aligned_targets(targets, mask, t_targets, t_mask)
        clone_losses: dict[str, torch.Tensor] = {}
        if self._fused_step():  # logits never made in full: from hidden states and heads
            hidden, head, t_hidden, t_head, clone_losses = self._hidden_and_heads(
                input_ids, attention_mask, t_input_ids, t_attention_mask
            )
            if self.shared_vocab is not None:
                head, t_head = head[: self.shared_vocab], t_head[: self.shared_vocab]
            loss_fn = self.kd_loss
            fused = functools.partial(
                head_kd_losses, kind=loss_fn.kind, temperature=loss_fn.temperature,
                beta=loss_fn.beta, skew_alpha=loss_fn.skew_alpha, chunk_size=loss_fn.chunk_size,
            )  # fmt: skip
            if rows is None:
                kd_tokens, ce_tokens = fused(hidden, head, t_hidden, t_head, targets, mask)
            else:
                kd_sel, ce_sel = fused(hidden[rows], head, t_hidden[t_rows], t_head,
                                       targets[rows], None)  # fmt: skip
                kd_tokens, ce_tokens = _scatter(kd_sel, rows, mask), _scatter(ce_sel, rows, mask)
            ce = ce_tokens.sum() / mask.sum().clamp_min(1)
        else:
            if self.co_run:  # one pass, teacher and student layer by layer (a low-rank clone)
                out = self.student(input_ids, attention_mask, with_teacher=True)
                student_logits, teacher_logits = out.logits, out.teacher_logits
                clone_losses = out.clone_losses
            else:
                with torch.no_grad():
                    teacher_logits = model_logits(self.teacher, t_input_ids, t_attention_mask)
                student_logits = model_logits(self.student, input_ids, attention_mask)
            student_logits, teacher_logits = self._vocab_aligned(student_logits, teacher_logits)
            if rows is None:
                kd_tokens = self.kd_loss(student_logits, teacher_logits, mask)
            else:
                kd_sel = self.kd_loss(student_logits[rows], teacher_logits[t_rows])
                kd_tokens = _scatter(kd_sel, rows, mask)
            ce = chunked_cross_entropy(
                student_logits, targets, mask, chunk_size=self.kd_loss.chunk_size,
                reduction="mean",
            )  # fmt: skip

        n_tokens = mask.sum().clamp_min(1)
        kd_per_example = kd_tokens.sum(dim=-1)
        weight = batch.get("weight")
        if weight is not None:
            kd_per_example = kd_per_example * weight.to(kd_per_example.dtype)
        kd = kd_per_example.sum() / n_tokens
        if self.scale_by_temperature_squared:
            kd = kd * self.kd_loss.temperature**2

        loss = self.kd_weight * kd + (self.ce_weight * ce if self.ce_weight else 0.0)
        terms = {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}
        if clone_losses:
            clone = torch.stack(list(clone_losses.values())).sum()
            if self.clone_weight:
                terms["loss"] = loss + self.clone_weight * clone
            terms["clone"] = clone.detach()
            terms.update({f"clone_{k}": v.detach() for k, v in clone_losses.items()})
        if not self.training:  # a reference level for evaluation, not worth a pass per step
            with torch.no_grad():
                terms["ce_teacher"] = chunked_cross_entropy(
                    teacher_logits,
                    t_targets,
                    t_mask,
                    chunk_size=self.kd_loss.chunk_size,
                    reduction="mean",
                )
        return terms

    def _fused_step(self) -> bool:
        """Whether this step takes the divergence and CE from hidden states and heads
        (``fused_head``): training steps only; ``None`` means on a CUDA device when supported."""
        if not self.training or self.fused_head is False:
            return False
        supported = self.co_run or (
            _final_norm(self.teacher) is not None
            and _final_norm(self.student) is not None
            and not is_sharded(self.student)
        )
        if self.fused_head and not supported:
            raise ValueError(
                "model.fused_head=true needs a LowRankClone student, or teacher and student that "
                "are Hugging Face causal LMs with a final norm (.model.norm) and a bias-free LM "
                "head, not sharded by FSDP2; set fused_head: null or false."
            )
        return supported and (self.fused_head or self.device.type == "cuda")

    def _hidden_and_heads(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        teacher_input_ids: torch.Tensor,
        teacher_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Final hidden states and LM head weights of student and teacher (on the teacher's
        own tokens), and clone losses."""
        if self.co_run:
            out = self.student(input_ids, attention_mask, with_teacher=True, return_hidden=True)
            return out.hidden, out.head, out.teacher_hidden, out.teacher_head, out.clone_losses
        with torch.no_grad():
            t_hidden = _final_hidden(self.teacher, teacher_input_ids, teacher_attention_mask)
        hidden = _final_hidden(self.student, input_ids, attention_mask)
        heads = [m.get_output_embeddings().weight for m in (self.student, self.teacher)]
        return hidden, heads[0], t_hidden, heads[1], {}

    def _log_terms(self, stage: str, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        on_step = stage == "train"
        sync = stage != "train"
        self.log(
            f"{stage}/loss", terms["loss"], prog_bar=True, on_step=on_step, on_epoch=not on_step,
            batch_size=batch_size, sync_dist=sync,
        )  # fmt: skip
        # Training logs one ``kd`` curve whatever the divergence (it may change mid-run, and
        # Lightning re-logs a step key that stopped being logged); evaluation names it.
        kd_name = "kd" if stage == "train" else f"kd_{self.kd_loss.kind}"
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
        on_policy = self.is_on_policy_step(batch_idx)
        if on_policy:
            batch = self.on_policy_batch(batch, batch_idx)
        terms = self.distillation_loss(batch)
        batch_size = batch["input_ids"].shape[0]
        self._log_terms("train", terms, batch_size)
        if self._on_policy_enabled:  # every step from then on: Lightning re-logs stale keys
            self.log_dict(
                {"train/on_policy": float(on_policy), **self._response_stats(batch)},
                on_step=True, batch_size=batch_size,
            )  # fmt: skip
        return terms["loss"]

    def _response_stats(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean target tokens per row, and the share of rows whose targets do not end with EOS
        (cut at the length limit), of the batch trained on (data or the student's rollouts)."""
        targets = batch["loss_mask"].to(torch.bool)
        if "attention_mask" in batch:
            targets &= batch["attention_mask"].to(torch.bool)
        positions = torch.arange(targets.shape[1], device=targets.device)
        last = torch.where(targets, positions, -1).amax(dim=-1)
        last_token = batch["input_ids"].gather(1, last.clamp_min(0)[:, None]).squeeze(1)
        eos = torch.tensor(self._eos_token_ids(), device=last_token.device)
        ended = torch.isin(last_token, eos) & (last >= 0)
        return {
            "train/response_tokens": targets.sum(dim=-1).float().mean(),
            "train/response_truncated": (~ended).float().mean(),
        }

    def is_on_policy_step(self, batch_idx: int) -> bool:
        """Whether this training batch uses the student's own completions.

        A fraction strictly between 0 and 1 is applied by a draw that depends only on
        ``on_policy_seed``, the global step and ``batch_idx``, so every rank agrees and a
        resumed run makes the same choices."""
        if self.on_policy_fraction <= 0.0:
            return False
        if self.on_policy_fraction >= 1.0:
            return True
        draw = row_seed(self.on_policy_seed, f"on_policy@{self.global_step}", batch_idx) / 2.0**63
        return draw < self.on_policy_fraction

    def on_policy_batch(
        self, batch: dict[str, torch.Tensor], batch_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Replace the responses of a prompt+response batch by the student's own completions.

        Returns:
            A batch of each row's prompt followed by one sampled completion, in which only the
            completion tokens are targets (``loss_mask``), with the original ``weight`` and
            ``problem_index`` carried over.
        """
        prompts = batch_prompts(batch)
        eos_ids = self._eos_token_ids()
        pad = self._pad_token_id(eos_ids)
        if "problem_index" in batch:
            keys: list[str | int] = batch["problem_index"].tolist()
        else:
            keys = [f"{self.global_rank}.{row}" for row in range(len(prompts))]
        model = generation_model(self.student, reuse=self._rollout_model)
        if model is not self.student:
            object.__setattr__(self, "_rollout_model", model)
        rollouts = generate(
            model,
            prompts,
            num_samples=1,
            max_new_tokens=self.on_policy_max_new_tokens,
            temperature=self.on_policy_temperature,
            top_p=self.on_policy_top_p,
            eos_token_id=eos_ids,
            pad_token_id=pad,
            batch_size=len(prompts),
            seed=row_seed(self.on_policy_seed, f"rollout@{self.global_step}", batch_idx),
            keys=keys,
        )
        completions = [per_prompt[0] for per_prompt in rollouts.completion_ids]
        out = completion_batch(prompts, completions, pad)
        teacher_batch = teacher_view(batch)
        if teacher_batch is not None:  # the teacher scores the same completions after its prompt
            teacher_out = completion_batch(batch_prompts(teacher_batch), completions, pad)
            out.update({f"teacher_{key}": value for key, value in teacher_out.items()})
        for key in ("weight", "problem_index"):
            if key in batch:
                out[key] = batch[key]
        return {key: value.to(self.device) for key, value in out.items()}

    def _token_setting(self, name: str) -> Any:
        """``eos_token_id`` / ``pad_token_id`` from the first source that names one: the
        teacher's tokenizer, the DataModule's, the teacher's generation config, its config."""
        trainer = attached_trainer(self)
        sources = (
            self.tokenizer,
            getattr(getattr(trainer, "datamodule", None), "tokenizer", None),
            getattr(self.teacher, "generation_config", None),
            getattr(self.teacher, "config", None),
        )
        for source in sources:
            value = getattr(source, name, None)
            if value is not None:
                return value
        return None

    def _eos_token_ids(self) -> list[int]:
        ids = (
            self.eos_token_id
            if self.eos_token_id is not None
            else self._token_setting("eos_token_id")
        )
        if ids is None:
            raise ValueError(
                "On-policy steps need an end-of-sequence token: set model.eos_token_id (no "
                "tokenizer or teacher config names one)."
            )
        return [ids] if isinstance(ids, int) else list(ids)

    def _pad_token_id(self, eos_ids: list[int]) -> int:
        pad = self._token_setting("pad_token_id")
        return eos_ids[0] if pad is None else int(pad)

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


def teacher_view(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The teacher's own ``input_ids`` / ``attention_mask`` / ``loss_mask`` of a batch whose
    teacher sees a different prompt (``teacher_*`` keys), or ``None`` when it sees the
    student's sequence."""
    if "teacher_input_ids" not in batch:
        return None
    keys = ("input_ids", "attention_mask", "loss_mask")
    return {key: batch[f"teacher_{key}"] for key in keys if f"teacher_{key}" in batch}


def _aligned_targets(
    targets: torch.Tensor, mask: torch.Tensor, t_targets: torch.Tensor, t_mask: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The (row, position) indices of the student's and the teacher's target positions, in the
    same order, after checking that each row predicts the same tokens in both sequences."""
    if mask.shape[0] != t_mask.shape[0]:
        raise ValueError(
            f"teacher_input_ids has {t_mask.shape[0]} rows, input_ids {mask.shape[0]}."
        )
    rows, t_rows = mask.nonzero(as_tuple=True), t_mask.nonzero(as_tuple=True)
    same = torch.equal(mask.sum(dim=1), t_mask.sum(dim=1)) and torch.equal(
        targets[rows], t_targets[t_rows]
    )
    if not same:
        raise ValueError(
            "The teacher's sequence (teacher_input_ids, teacher_loss_mask) must contain the "
            "same response tokens as the student's, after its own prompt: the targets differ."
        )
    return rows, t_rows


def _scatter(
    values: torch.Tensor, rows: tuple[torch.Tensor, ...], like: torch.Tensor
) -> torch.Tensor:
    """``values`` of the selected positions ``rows`` placed in a zero tensor shaped ``like``."""
    out = values.new_zeros(like.shape)
    out[rows] = values
    return out


def next_token_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token targets [B, L] of a batch and the mask [B, L] of the positions whose
    prediction counts (the batch's ``loss_mask`` and ``attention_mask``, shifted by one).

    Position i predicts token i + 1. Shifting the targets and the mask (rather than slicing the
    logits) keeps the logits contiguous: a sliced [B, L-1, V] view would cost a second
    full-size gradient buffer in backward. The last position is never a target.
    """
    input_ids = batch["input_ids"]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:, :-1] = batch["loss_mask"][:, 1:].to(torch.bool)
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        mask[:, :-1] &= attention_mask[:, 1:].to(torch.bool)
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    return targets, mask


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm of a Hugging Face causal LM whose logits are ``lm_head(norm(h))`` (no
    head bias, soft-capping or logit scale), or None."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    plain_head = isinstance(head, nn.Linear) and head.bias is None
    scaled = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    return norm if isinstance(norm, nn.Module) and plain_head and not scaled else None


def _final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The final normed hidden states [B, L, d] of a Hugging Face causal LM, taken from its
    final norm during a forward that computes logits for no position."""
    captured: list[torch.Tensor] = []
    handle = _final_norm(model).register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=none)
    finally:
        handle.remove()
    return captured[-1]


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


def _check_on_policy_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"model.on_policy_fraction={fraction}; it is a share in [0, 1].")
