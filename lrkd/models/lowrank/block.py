"""One decoder layer of a Low-Rank Clone: teacher layer i and student layer i, run together.

A :class:`CloneBlock` holds the trained projections of layer i and the student layer whose
linear weights they generate, refers to the frozen teacher layer they are generated from, and
takes the activation clone terms between the two layers as soon as both have run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lrkd._compat import call_decoder_layer
from lrkd.models.lowrank.weights import LAYER_LINEARS, GeneratedTensor, generate
from lrkd.models.teachers import exclude_from_state_dict

__all__ = ["ATTN_OUT_SPACES", "CLONE_LOSSES", "CLONE_TERMS", "CloneBlock", "CloneTerms"]

CLONE_TERMS: tuple[str, ...] = ("q", "k", "v", "gate", "up", "attn_out", "ffn_out")
"""Activation clone terms: pre-RoPE q/k/v, gate and up pre-activations, attention output
(o_proj) and FFN output (down_proj)."""

CLONE_LOSSES: tuple[str, ...] = ("mse", "relative_mse")
"""Per-term clone loss: plain MSE (the paper), or MSE over the target's mean square."""

ATTN_OUT_SPACES: tuple[str, ...] = ("student", "teacher")
"""Where the attention-output term compares: in the student's hidden space, against the
teacher's output mapped by the o projection (the paper), or in the teacher's, both attention
outputs through the teacher's o_proj, before the o projection (the official code)."""

# Which linear's output each clone term compares, and whether it lives in the hidden space
# (then the teacher's side is mapped into student space by that linear's projection).
_TERM_TAPS: dict[str, tuple[str, bool]] = {
    "q": ("self_attn.q_proj", False),
    "k": ("self_attn.k_proj", False),
    "v": ("self_attn.v_proj", False),
    "gate": ("mlp.gate_proj", False),
    "up": ("mlp.up_proj", False),
    "attn_out": ("self_attn.o_proj", True),
    "ffn_out": ("mlp.down_proj", True),
}
# The projection that maps each hidden-space term's teacher activation into student space.
_TERM_PROJ = {"attn_out": "o", "ffn_out": "down"}
# The student's attention output before o_proj (for the teacher-space attention-output term).
_O_INPUT = "student.self_attn.o_proj.input"


@dataclass(frozen=True)
class CloneTerms:
    """Which clone terms a layer computes, and how.

    Attributes:
        terms: the terms (a subset of :data:`CLONE_TERMS`); empty computes none.
        relative: divide each term by the teacher activation's mean square.
        target_grad: let gradients flow through the projection that maps the teacher's
            attention/FFN outputs into student space.
        attn_out_space: ``student`` or ``teacher`` (:data:`ATTN_OUT_SPACES`).
    """

    terms: tuple[str, ...] = ()
    relative: bool = False
    target_grad: bool = False
    attn_out_space: str = "student"


def _masked_mse(
    student: torch.Tensor,
    target: torch.Tensor,
    token_mask: torch.Tensor | None,
    relative: bool = False,
) -> torch.Tensor:
    """Mean squared error over the elements of the tokens ``token_mask`` selects.

    Only the difference is kept for backward (not the teacher's activation).

    Args:
        student: the student's activation [B, L, D].
        target: the teacher's activation, in the same space [B, L, D].
        token_mask: 1 for the tokens that count [B, L], or None for all.
        relative: divide by the target's mean square (computed without gradient).

    Returns:
        The scalar loss, in float32.
    """
    dtype = torch.promote_types(student.dtype, torch.float32)  # float64 stays float64
    diff = student.to(dtype) - target.to(dtype)
    if token_mask is None:
        mse = diff.pow(2).mean()
    else:
        n = token_mask.sum().clamp_min(1)
        mse = (diff.pow(2).mean(dim=-1) * token_mask).sum() / n
    if relative:
        with torch.no_grad():
            t2 = target.to(dtype).pow(2)
            power = t2.mean() if token_mask is None else (t2.mean(-1) * token_mask).sum() / n
        mse = mse / power.clamp_min(1e-12)
    return mse


class CloneBlock(nn.Module):
    """One decoder layer of a :class:`~lrkd.models.lowrank.LowRankClone`: the trained
    projections, the student layer whose linear weights they generate, and (by reference) the
    frozen teacher layer they are generated from.

    The block is the clone's sharding unit under FSDP2:
    :meth:`~lrkd.models.lowrank.LowRankClone.fully_shard` registers the teacher layer as the
    child ``teacher_layer`` first, so that one gather brings the teacher layer, its projections
    and the student layer together and the teacher is sharded with them. The teacher layer never
    appears in the block's ``state_dict``.

    Args:
        teacher_layer: the teacher's decoder layer i.
        layer: the student's decoder layer i (its linear weights are generated).
        projections: the trained projections of layer i, by linear (q, k, v, o, gate, up, down).

    Attributes:
        specs: how each of the layer's generated (or copied) tensors is made.
    """

    def __init__(
        self, teacher_layer: nn.Module, layer: nn.Module, projections: nn.ParameterDict
    ) -> None:
        super().__init__()
        self._teacher_layer = [teacher_layer]  # registered only for sharding (attach_teacher)
        self.projections = projections
        self.layer = layer
        self.specs: list[GeneratedTensor] = []
        self._taps: dict[str, torch.Tensor] | None = None
        for side, owner in (("teacher", teacher_layer), ("student", layer)):
            for path, _ in _TERM_TAPS.values():
                owner.get_submodule(path).register_forward_hook(self._tap_hook(f"{side}.{path}"))
        layer.self_attn.o_proj.register_forward_hook(self._tap_hook(_O_INPUT, take_input=True))
        exclude_from_state_dict(self, ("teacher_layer",))

    @classmethod
    def from_skeleton(
        cls,
        index: int,
        teacher_layer: nn.Module,
        layer: nn.Module,
        hidden_size: int,
        device: torch.device,
    ) -> CloneBlock:
        """A block over a student layer built on the meta device from the clone's config.

        The projections are allocated (uninitialised) on ``device``; the student layer's linear
        weights are removed and recorded in :attr:`specs` instead (biases on the input side are
        the teacher's, copied by reference; output-side biases are projected); its norm gains
        start at one, except Qwen3's head-space q/k norms, which keep the teacher's gains.

        Args:
            index: the layer's index i (names the exported tensors ``model.layers.{i}.*``).
            teacher_layer: the teacher's decoder layer i.
            layer: the student's decoder layer i, on the meta device.
            hidden_size: the student's hidden size d_S.
            device: where the projections and norm gains live (the teacher's device).

        Returns:
            The block.
        """
        d_teacher = teacher_layer.get_submodule(LAYER_LINEARS[0][0]).in_features
        projections = nn.ParameterDict(
            {
                key: nn.Parameter(torch.empty(d_teacher, hidden_size, device=device))
                for _, key, _ in LAYER_LINEARS
            }
        )
        block = cls(teacher_layer, layer, projections)
        block._generate_linears(index)
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name)
            norm.weight = nn.Parameter(torch.ones(hidden_size, device=device))
        for name in ("q_norm", "k_norm"):  # qwen3: head-space norms keep the teacher's gains
            if hasattr(layer.self_attn, name):
                t_gain = getattr(teacher_layer.self_attn, name).weight
                getattr(layer.self_attn, name).weight = nn.Parameter(
                    t_gain.detach().to(device=device, dtype=torch.float32).clone()
                )
        return block

    def _generate_linears(self, index: int) -> None:
        """Strip the student layer's linear weights and record in :attr:`specs` how they are
        made from the teacher layer's."""
        for path, key, side in LAYER_LINEARS:
            s_lin = self.layer.get_submodule(path)
            t_lin = self.teacher_layer_ref.get_submodule(path)
            prefix = f"model.layers.{index}.{path}"
            del s_lin.weight
            self.specs.append(
                GeneratedTensor(f"{prefix}.weight", s_lin, "weight", t_lin, "weight", side,
                                self.projections, key)
            )  # fmt: skip
            if t_lin.bias is not None:
                del s_lin.bias
                kind, owner = ("copy", None) if side == "in" else ("bias_out", self.projections)
                self.specs.append(
                    GeneratedTensor(f"{prefix}.bias", s_lin, "bias", t_lin, "bias", kind, owner,
                                    key)
                )  # fmt: skip

    @property
    def teacher_layer_ref(self) -> nn.Module:
        """The teacher's decoder layer this block is generated from."""
        return self._teacher_layer[0]

    def attach_teacher(self) -> None:
        """Register the teacher layer as a child, so that sharding this block shards it too."""
        self.teacher_layer = self._teacher_layer[0]

    def _tap_hook(self, name: str, take_input: bool = False) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._taps is not None:
                self._taps[name] = args[0] if take_input else output

        return hook

    def generate(self) -> dict[str, torch.Tensor]:
        """This layer's generated student tensors, by exported name."""
        return {spec.name: generate(spec) for spec in self.specs}

    def forward(self, *args: Any, checkpointing: bool = False) -> Any:
        """Teacher layer i (no grad) and student layer i, and the clone terms between them.

        Runs :meth:`pair`, under activation checkpointing (recomputed in backward instead of
        storing activations) with ``checkpointing`` while gradients are on. The checkpoint is
        inside the block, so FSDP2's hooks on the block stay outside it.

        Args:
            *args: the arguments of :meth:`pair`.
            checkpointing: recompute the pair in backward.

        Returns:
            What :meth:`pair` returns.
        """
        if checkpointing and torch.is_grad_enabled():
            return checkpoint(self.pair, *args, use_reentrant=False)
        return self.pair(*args)

    def pair(
        self,
        h_s: torch.Tensor,
        h_t: torch.Tensor | None,
        s_pos: Any,
        t_pos: Any,
        token_mask: torch.Tensor | None,
        s_mask: Any,
        t_mask: Any,
        position_ids: torch.Tensor,
        clone: CloneTerms = CloneTerms(),
        weights: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Run teacher layer i and student layer i on their hidden states.

        Args:
            h_s: the student's hidden states.
            h_t: the teacher's hidden states (None: run the student only).
            s_pos: the student's rotary position embeddings.
            t_pos: the teacher's rotary position embeddings.
            token_mask: 1 for real tokens (the clone losses' mean), or None.
            s_mask: the student's attention mask.
            t_mask: the teacher's attention mask.
            position_ids: token positions.
            clone: the clone terms to compute, and how.
            weights: the clone's cached generated weights; ``None`` generates this layer's
                inside the autograd graph (and inside the FSDP2 gather).

        Returns:
            The new hidden states and the clone loss of each term.
        """
        generated = self.generate() if weights is None else weights
        for spec in self.specs:
            setattr(spec.module, spec.attr, generated[spec.name])
        taps: dict[str, torch.Tensor] = {}
        self._taps = taps if clone.terms else None
        try:
            if h_t is not None:
                with torch.no_grad():
                    h_t = call_decoder_layer(
                        self.teacher_layer_ref, h_t, t_mask, t_pos, position_ids
                    )
            h_s = call_decoder_layer(self.layer, h_s, s_mask, s_pos, position_ids)
        finally:
            self._taps = None
        losses = []
        for name in clone.terms:
            path, hidden_side = _TERM_TAPS[name]
            student, target = taps[f"student.{path}"], taps[f"teacher.{path}"]
            if name == "attn_out" and clone.attn_out_space == "teacher":
                # both through the teacher's o_proj: the o projection gets no clone gradient
                o_proj = self.teacher_layer_ref.get_submodule(path)
                a_s = taps[_O_INPUT]
                bias = None if o_proj.bias is None else o_proj.bias.to(a_s.dtype)
                student = F.linear(a_s, o_proj.weight.to(a_s.dtype), bias)
            elif hidden_side:
                proj = self.projections[_TERM_PROJ[name]]
                with torch.set_grad_enabled(clone.target_grad and torch.is_grad_enabled()):
                    target = target.to(proj.dtype) @ proj
            losses.append(_masked_mse(student, target, token_mask, clone.relative))
        return h_s, h_t, losses
