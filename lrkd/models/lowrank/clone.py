"""The Low-Rank Clone student: its structure, generated weights and forward.

The maths is in the package docstring (:mod:`lrkd.models.lowrank`); the initialisations are in
:mod:`~lrkd.models.lowrank.inits`, sharding in :mod:`~lrkd.models.lowrank.sharding`, export in
:mod:`~lrkd.models.lowrank.export`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrkd._compat import attention_implementation, causal_mask
from lrkd.models.lowrank.block import (
    ATTN_OUT_SPACES,
    CLONE_LOSSES,
    CLONE_TERMS,
    CloneBlock,
    CloneTerms,
)
from lrkd.models.lowrank.cache import WeightCache
from lrkd.models.lowrank.export import materialize as export_materialize
from lrkd.models.lowrank.family import check_hidden_size, check_teacher, student_config_for
from lrkd.models.lowrank.inits import INITS, initialise, missing_probe_message
from lrkd.models.lowrank.sharding import ROOT_TEACHER_PARTS
from lrkd.models.lowrank.sharding import fully_shard as sharding_fully_shard
from lrkd.models.lowrank.weights import GeneratedTensor, generate, generation_dtype
from lrkd.models.protocols import CoRunOutput
from lrkd.models.teachers import exclude_from_state_dict

__all__ = ["LowRankClone", "LowRankCloneOutput"]

#: What :meth:`LowRankClone.forward` returns (the co-run output of lrkd.models.protocols).
LowRankCloneOutput = CoRunOutput


class LowRankClone(nn.Module):
    """A student generated from a frozen teacher by trained low-rank projections (LRC).

    It implements the student protocols :class:`~lrkd.models.protocols.CoRunStudent`,
    :class:`~lrkd.models.protocols.Materializable`, :class:`~lrkd.models.protocols.SelfSharding`,
    :class:`~lrkd.models.protocols.GradFlushing` and
    :class:`~lrkd.models.protocols.ActivationCheckpointing`.

    Args:
        teacher: the frozen teacher, a transformers causal LM of a supported family
            (``llama`` incl. SmolLM2 and Llama-3.x, ``mistral``, ``qwen2``, ``qwen3``). It is
            referenced, not copied, and not registered as a submodule (so it is not in this
            module's state_dict or parameters); move it together with the clone.
        hidden_size: the student's hidden size d_S (the rank), at most the teacher's and a
            multiple of its number of attention heads.
        init: projection initialisation: ``normal`` (the paper: every P ~ N(0, init_std)),
            ``embedding_pca`` (every P = the top-d_S right singular vectors of the teacher's
            embedding matrix), or ``activation_pca`` (the top-d_S principal directions of the
            teacher's normalised residual stream on ``probe_input_ids``, with the teacher's norm
            gains and the residual-norm ratio folded in so the initial student computes the
            teacher restricted to that subspace; see docs/lowrank.md).
        init_std: standard deviation of the ``normal`` init.
        probe_input_ids: token ids [B, L] the teacher is run on for ``activation_pca``
            (required there, unused otherwise); build them with lrkd's
            ``data.probe.probe_batch(tokenizer)`` and the teacher's tokenizer.
            :class:`~lrkd.models.lowrank.LowRankCloneBuilder` under the DistillationModule
            builds them itself.
        clone_terms: which activation clone terms to compute (subset of
            ``q, k, v, gate, up, attn_out, ffn_out``); empty disables the clone loss.
        clone_loss: ``mse`` (the paper: mean squared error per term and layer) or
            ``relative_mse`` (each term's MSE divided by the teacher activation's mean square,
            so that layers with very large activations do not dominate).
        clone_target_grad: let the clone loss's gradient also flow through the projection
            that maps the teacher's attention/FFN outputs into student space (as the official
            code does). ``False`` treats the mapped teacher output as a fixed target, which
            also avoids keeping the teacher's hidden-width activations for backward.
        attn_out_space: where the ``attn_out`` term compares: ``student`` (the paper: the
            student's o_proj output against the teacher's mapped by the o projection) or
            ``teacher`` (the official code: both attention outputs through the teacher's
            o_proj, in the teacher's hidden space, so the o projection gets no clone gradient).
        tie_embedding_projection: one projection for the embedding and the LM head (the
            official code's ``tie_word_emb_proj``). ``None`` ties exactly when the teacher ties
            its embeddings. The exported student ties its embeddings only when both the
            teacher and the projections are tied.
        norm_eps: the student's RMSNorm epsilon (the official code's ``target_rms_norm_eps``,
            1e-5 there); ``None`` keeps the teacher's ``rms_norm_eps``.
        gradient_checkpointing: recompute each (teacher layer, student layer) pair in
            backward instead of storing the student layer's activations.
        cache_weights: generate the weights once per optimizer step (the caller must call
            :meth:`flush_weight_grads` before each optimizer step; the DistillationModule
            does). ``False`` generates them inside autograd on every forward.
        seed: seed of the ``normal`` init; ``None`` uses the global RNG.

    Raises:
        ValueError: an argument is out of range or unknown, the teacher's family is not
            supported, or ``activation_pca`` has no ``probe_input_ids``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        hidden_size: int,
        init: str = "normal",
        init_std: float = 0.02,
        probe_input_ids: torch.Tensor | None = None,
        clone_terms: Sequence[str] = CLONE_TERMS,
        clone_loss: str = "mse",
        clone_target_grad: bool = False,
        attn_out_space: str = "student",
        tie_embedding_projection: bool | None = None,
        norm_eps: float | None = None,
        gradient_checkpointing: bool = False,
        cache_weights: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        t_config = _check_arguments(
            teacher, hidden_size, init, probe_input_ids, clone_terms, clone_loss, attn_out_space,
            norm_eps,
        )  # fmt: skip
        self._teacher = [teacher]  # a reference, deliberately not a registered submodule
        self.hidden_size = hidden_size
        #: The clone terms every layer computes, and how.
        self.clone = CloneTerms(
            tuple(clone_terms), clone_loss == "relative_mse", clone_target_grad, attn_out_space
        )
        self.gradient_checkpointing = gradient_checkpointing
        self.cache_weights = cache_weights
        teacher_tied = bool(getattr(t_config, "tie_word_embeddings", False))
        #: One projection serves the embedding and the LM head.
        self.tied_projection = (
            teacher_tied if tie_embedding_projection is None else bool(tie_embedding_projection)
        )
        #: The student's embedding and LM head are one tensor (teacher and projection tied).
        self.tied = teacher_tied and self.tied_projection
        self.config = student_config_for(t_config, hidden_size, norm_eps, self.tied)

        from transformers import AutoModelForCausalLM

        attn = attention_implementation(t_config)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                self.config, attn_implementation=attn, dtype=torch.float32
            )
        device = teacher.lm_head.weight.device
        self.blocks = nn.ModuleList(
            CloneBlock.from_skeleton(i, teacher.model.layers[i], layer, hidden_size, device)
            for i, layer in enumerate(skeleton.model.layers)
        )
        self.norm = skeleton.model.norm
        d_teacher = t_config.hidden_size
        self.embed_projection = nn.Parameter(torch.empty(d_teacher, hidden_size, device=device))
        self.head_projection = (
            None
            if self.tied_projection
            else nn.Parameter(torch.empty(d_teacher, hidden_size, device=device))
        )
        self.root_specs = self._root_specs(device)
        self._weight_cache = WeightCache()
        exclude_from_state_dict(self, ROOT_TEACHER_PARTS)
        initialise(self, init, init_std, seed, probe_input_ids)

    # ------------------------------------------------------------------ structure
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher this clone is generated from."""
        return self._teacher[0]

    @property
    def layers(self) -> list[nn.Module]:
        """The student's decoder layers (their linear weights are generated)."""
        return [block.layer for block in self.blocks]

    @property
    def projections(self) -> list[nn.ParameterDict]:
        """Per layer, the trained projections by linear (q, k, v, o, gate, up, down)."""
        return [block.projections for block in self.blocks]

    def all_projections(self) -> list[nn.Parameter]:
        """Every projection parameter (per-layer ones, embedding, and LM head if untied)."""
        params = [p for d in self.projections for p in d.values()]
        params.append(self.embed_projection)
        if self.head_projection is not None:
            params.append(self.head_projection)
        return params

    def paired_blocks(self) -> list[nn.Module]:
        """The :class:`CloneBlock` of each layer: its output begins with (student hidden,
        teacher hidden) after the layer."""
        return list(self.blocks)

    def generated_tensors(self) -> list[GeneratedTensor]:
        """How every student tensor is made: each layer's, then the embedding's and the LM
        head's (the head unless the student ties it to the embedding). Each one counts its
        generations
        (:attr:`GeneratedTensor.generations`)."""
        return [spec for block in self.blocks for spec in block.specs] + self.root_specs

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute each (teacher layer, student layer) pair in backward (non-reentrant
        ``torch.utils.checkpoint``; ``gradient_checkpointing_kwargs`` is not used)."""
        self.gradient_checkpointing = True

    def train(self, mode: bool = True) -> LowRankClone:
        """Set train/eval mode; the teacher modules registered for sharding stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _root_specs(self, device: torch.device) -> list[GeneratedTensor]:
        """Give the final norm a fresh gain, check that every student tensor has been handled,
        and return the specs of the embedding and LM head."""
        teacher = self.teacher
        self.norm.weight = nn.Parameter(torch.ones(self.hidden_size, device=device))
        specs = [
            GeneratedTensor("model.embed_tokens.weight", None, "", teacher.model.embed_tokens,
                            "weight", "in", self, "embed_projection")
        ]  # fmt: skip
        if not self.tied:
            key = "embed_projection" if self.tied_projection else "head_projection"
            specs.append(
                GeneratedTensor("lm_head.weight", None, "", teacher.lm_head, "weight", "in", self,
                                key)
            )  # fmt: skip
        if device.type != "meta":  # a teacher on the meta device gives a meta clone
            for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
                if tensor.is_meta:
                    raise RuntimeError(f"LowRankClone: unhandled student tensor {name}")
        return specs

    def fully_shard(
        self,
        mesh: Any = None,
        mp_policy: Any = None,
        reshard_after_forward: bool = True,
    ) -> None:
        """Shard the clone and its teacher with FSDP2 (``torch.distributed.fsdp.fully_shard``).

        Each :class:`CloneBlock` (teacher layer i, its projections, student layer i) is one
        unit; the clone itself is the root unit, holding the projections of the embedding and
        head, the final norm gain, and the teacher's embedding, final norm and LM head. So every
        teacher parameter is sharded, and one gather brings a layer's teacher weights together
        with the projections that generate the student's. Weights are then generated inside the
        forward (``cache_weights`` must be off). See
        :func:`lrkd.models.lowrank.sharding.fully_shard`.

        Args:
            mesh: the data-parallel device mesh (``None``: all ranks).
            mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (``None``: keep dtypes).
            reshard_after_forward: free each block's gathered weights after its forward
                (gathering again in backward), as in ZeRO-3.
        """
        sharding_fully_shard(self, mesh, mp_policy, reshard_after_forward)

    # ------------------------------------------------------------------ weights
    def generated_weights(self) -> dict[str, torch.Tensor]:
        """Generate (or return the cached) student tensors, by their exported names.

        Under autocast (``trainer.precision: bf16-mixed``) they are generated in the autocast
        dtype, the dtype the layers would cast them to anyway: the products run on tensor
        cores, and cached weights and their gradients take half the memory of fp32 ones.
        Otherwise they take the projections' dtype.

        Raises:
            RuntimeError: with ``cache_weights``, the projections or the dtype changed while
                gradients on the cached weights were not flushed.
        """
        device = self.embed_projection.device
        dtype = generation_dtype(device, self.embed_projection.dtype)
        if not self.cache_weights:
            return {spec.name: generate(spec, dtype) for spec in self.generated_tensors()}
        return self._weight_cache.get(
            self.generated_tensors(), self.all_projections(), dtype, device.type
        )

    def cached_weights(self) -> dict[str, torch.Tensor] | None:
        """The weights cached for the current optimizer step (``cache_weights``), by exported
        name: generated ones are leaf tensors holding the gradients accumulated since the last
        :meth:`flush_weight_grads`. ``None`` before the first forward or without the cache."""
        return self._weight_cache.weights

    def flush_weight_grads(self) -> None:
        """Turn the gradients accumulated on cached generated weights into projection gradients.

        Call after the last backward of an optimizer step, before ``optimizer.step()``. Without
        ``cache_weights`` this does nothing.
        """
        if self.cache_weights:
            self._weight_cache.flush(self.generated_tensors())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        with_teacher: bool = False,
        return_hidden: bool = False,
        **kwargs: Any,
    ) -> LowRankCloneOutput:
        """Run the student (and, with ``with_teacher``, the teacher alongside).

        Args:
            input_ids: token ids [B, L].
            attention_mask: 1 for real tokens, 0 for padding [B, L].
            position_ids: positions [B, L]; ``None`` is 0..L-1.
            with_teacher: also run the teacher layer by layer, return its logits and the
                activation clone losses.
            return_hidden: return the final hidden states and LM head weights instead of
                logits (for :func:`lrkd.losses.head_kd_losses`, which never makes full logits).
            **kwargs: ignored (what transformers' callers may pass).

        Returns:
            A :class:`LowRankCloneOutput`.
        """
        weights = self.generated_weights() if self.cache_weights else None
        embed_w, head_w = self._embedding_and_head(weights)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        # Always the masked mean when there is a mask: checking for all-ones would sync the host.
        token_mask = None if attention_mask is None else attention_mask.to(torch.float32)

        # Under autocast the embedding is generated in bf16; the residual stream stays in the
        # projections' dtype (fp32 under bf16-mixed), as a plain student's would.
        h_s = F.embedding(input_ids, embed_w).to(self.embed_projection.dtype)
        s_masks = _layer_masks(self.config, h_s, attention_mask, position_ids)
        s_pos = self.teacher.model.rotary_emb(h_s, position_ids=position_ids)
        h_t = t_masks = t_pos = None
        if with_teacher:
            h_t, t_masks, t_pos = self._teacher_inputs(input_ids, attention_mask, position_ids)

        clone = self.clone if with_teacher else CloneTerms()
        totals: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            h_s, h_t, losses = block(
                h_s, h_t, s_pos, t_pos, token_mask, s_masks[i], t_masks[i] if t_masks else None,
                position_ids, clone, weights, checkpointing=self.gradient_checkpointing,
            )  # fmt: skip
            for name, value in zip(clone.terms, losses, strict=True):
                totals[name] = totals[name] + value if name in totals else value

        return self._output(h_s, h_t, head_w, totals, return_hidden)

    @torch.no_grad()
    def _teacher_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, list[Any], Any]:
        """The teacher's embeddings, per-layer masks and rotary position embeddings."""
        teacher = self.teacher
        h_t = teacher.model.embed_tokens(input_ids)
        t_masks = _layer_masks(teacher.config, h_t, attention_mask, position_ids)
        return h_t, t_masks, teacher.model.rotary_emb(h_t, position_ids=position_ids)

    def _output(
        self,
        h_s: torch.Tensor,
        h_t: torch.Tensor | None,
        head_w: torch.Tensor,
        totals: dict[str, torch.Tensor],
        return_hidden: bool,
    ) -> LowRankCloneOutput:
        """Final norms, then logits (or, with ``return_hidden``, hidden states and heads)."""
        teacher = self.teacher
        hidden = self.norm(h_s)
        teacher_hidden = None
        if h_t is not None:
            with torch.no_grad():
                teacher_hidden = teacher.model.norm(h_t)
        if return_hidden:
            teacher_head = teacher.lm_head.weight if h_t is not None else None
            return LowRankCloneOutput(None, None, totals, hidden, head_w, teacher_hidden,
                                      teacher_head)  # fmt: skip
        teacher_logits = None
        if teacher_hidden is not None:
            with torch.no_grad():
                teacher_logits = teacher.lm_head(teacher_hidden)
        return LowRankCloneOutput(F.linear(hidden, head_w), teacher_logits, totals)

    def _embedding_and_head(
        self, weights: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's embedding and LM-head matrices (the same tensor when tied), from
        ``weights`` or generated now."""
        if weights is None:
            weights = {spec.name: generate(spec) for spec in self.root_specs}
        embed = weights["model.embed_tokens.weight"]
        return embed, weights.get("lm_head.weight", embed)

    # ------------------------------------------------------------------ export
    def materialize(
        self, dtype: torch.dtype = torch.float32, into: nn.Module | None = None
    ) -> nn.Module:
        """Multiply the projections out and return a plain transformers model of the teacher's
        family with ``hidden_size = d_S`` (its config carries an explicit ``head_dim``).

        Under FSDP2 (after :meth:`fully_shard`) each unit is gathered in turn, so every rank
        gets the whole student (every rank must call this together); the teacher is never
        gathered whole. See :func:`lrkd.models.lowrank.export.materialize`.

        Args:
            dtype: dtype of the new model (ignored with ``into``).
            into: a model returned by an earlier call: its weights are overwritten in place (on
                its own device and dtype) instead of building a new model, which saves the
                model construction when a fresh copy is needed every step (on-policy rollouts).
                With ``cache_weights`` the generated weights are the step's cached ones, so the
                training forward that follows does not generate them again.
        """
        return export_materialize(self, dtype, into)


def _check_arguments(
    teacher: nn.Module,
    hidden_size: int,
    init: str,
    probe_input_ids: torch.Tensor | None,
    clone_terms: Sequence[str],
    clone_loss: str,
    attn_out_space: str,
    norm_eps: float | None,
) -> Any:
    """Check :class:`LowRankClone`'s arguments (each error names the fix).

    Returns:
        The teacher's Hugging Face config.

    Raises:
        ValueError: the first argument found out of range or unknown.
    """
    if clone_loss not in CLONE_LOSSES:
        raise ValueError(
            f"LowRankClone: clone_loss={clone_loss!r}; choose one of {', '.join(CLONE_LOSSES)}."
        )
    if attn_out_space not in ATTN_OUT_SPACES:
        raise ValueError(
            f"LowRankClone: attn_out_space={attn_out_space!r}; choose one of "
            f"{', '.join(ATTN_OUT_SPACES)}."
        )
    if norm_eps is not None and not norm_eps > 0:
        raise ValueError(
            f"LowRankClone: norm_eps={norm_eps} must be > 0 (or null for the teacher's)."
        )
    t_config = check_teacher(teacher)
    check_hidden_size(hidden_size, t_config)
    if init not in INITS:
        raise ValueError(f"LowRankClone: init={init!r}; choose one of {', '.join(INITS)}.")
    unknown = [t for t in clone_terms if t not in CLONE_TERMS]
    if unknown:
        raise ValueError(
            f"LowRankClone: unknown clone_terms {unknown}; choose from {', '.join(CLONE_TERMS)}."
        )
    if init == "activation_pca" and probe_input_ids is None:
        raise ValueError(missing_probe_message("LowRankClone"))
    return t_config


def _layer_masks(
    config: Any,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
) -> list[Any]:
    """Per-layer attention masks, made by transformers' own mask functions.

    Args:
        config: the model's Hugging Face config (its ``layer_types`` or ``sliding_window``
            choose each layer's mask kind).
        embeds: the input embeddings [B, L, D].
        attention_mask: 1 for real tokens [B, L], or None.
        position_ids: token positions.

    Returns:
        One mask per layer (layers of the same kind share one).
    """
    made: dict[str, Any] = {}

    def mask(kind: str) -> Any:
        if kind not in made:
            made[kind] = causal_mask(kind, config, embeds, attention_mask, position_ids)
        return made[kind]

    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [mask(layer_types[i]) for i in range(config.num_hidden_layers)]
    default = (
        "sliding_attention"
        if getattr(config, "sliding_window", None) is not None
        else "full_attention"
    )
    return [mask(default)] * config.num_hidden_layers
