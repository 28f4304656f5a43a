"""Low-Rank Clone (LRC): a student whose weights are generated from the frozen teacher.

For every decoder layer ``i`` and every linear ``m`` in q, k, v, o, gate, up, down there is a
trained projection ``P[i, m]`` of shape ``(d_T, d_S)`` acting on the hidden side of the teacher's
weight (``nn.Linear`` weights are ``[out, in]``)::

    q, k, v, gate, up (hidden is the input):   W_S = W_T @ P              [out, d_S]
    o, down           (hidden is the output):  W_S = P^T @ W_T            [d_S, in]
    embedding and LM head:                     E_S = E_T @ P_emb          [vocab, d_S]

Only the hidden size shrinks; layer count, heads, head_dim, FFN width and vocabulary stay the
teacher's. Trainable: the projections and the student's RMSNorm gains. The teacher's weights are
referenced (never copied) and stay frozen.

The student runs through the teacher family's own transformers decoder layers (attention, RoPE,
GQA, masks, sdpa): the clone holds a set of decoder layers built from the student config whose
linear weights are replaced by the generated tensors. Teacher and student run layer by layer
together so that the activation clone loss of layer ``i`` is taken as soon as both activations
exist; the teacher's activations are never kept for all layers.

``materialize()`` multiplies the projections out once and returns a plain transformers model of
the teacher's family with ``hidden_size = d_S`` and an explicit ``head_dim``.

Weight generation costs ``d_out * d_T * d_S`` multiply-adds per weight, independent of the
batch. With ``cache_weights=True`` the generated weights are made once per optimizer step (as
leaf tensors that accumulate gradients over micro-batches) and
:meth:`LowRankClone.flush_weight_grads` turns those gradients into projection gradients once,
just before the optimizer step (the DistillationModule calls it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lrkd._compat import (
    attention_implementation,
    call_decoder_layer,
    causal_mask,
    derived_config,
    tensor_version,
)
from lrkd.models.protocols import CoRunOutput
from lrkd.models.students import StudentBuilder
from lrkd.models.teachers import exclude_from_state_dict

log = logging.getLogger("lrkd")

SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
"""``config.model_type`` values LowRankClone supports (Llama covers SmolLM2 and Llama-3.x)."""

CLONE_TERMS: tuple[str, ...] = ("q", "k", "v", "gate", "up", "attn_out", "ffn_out")
"""Activation clone terms: pre-RoPE q/k/v, gate and up pre-activations, attention output
(o_proj) and FFN output (down_proj)."""

CLONE_LOSSES: tuple[str, ...] = ("mse", "relative_mse")
"""Per-term clone loss: plain MSE (the paper), or MSE over the target's mean square."""

INITS: tuple[str, ...] = ("normal", "embedding_pca", "activation_pca")
"""Projection initialisations; see :class:`LowRankClone`."""

# (student module path inside a decoder layer, projection key, side).
# "in": the hidden side is the weight's input; "out": the hidden side is its output.
_LAYER_LINEARS: tuple[tuple[str, str, str], ...] = (
    ("self_attn.q_proj", "q", "in"),
    ("self_attn.k_proj", "k", "in"),
    ("self_attn.v_proj", "v", "in"),
    ("self_attn.o_proj", "o", "out"),
    ("mlp.gate_proj", "gate", "in"),
    ("mlp.up_proj", "up", "in"),
    ("mlp.down_proj", "down", "out"),
)
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
_TERM_PROJ = {"attn_out": "o", "ffn_out": "down"}
# The teacher's modules outside its layers that a sharded clone registers (see fully_shard).
_ROOT_TEACHER_PARTS: tuple[str, ...] = ("teacher_embed", "teacher_norm", "teacher_head")


#: What :meth:`LowRankClone.forward` returns (the co-run output of lrkd.models.protocols).
LowRankCloneOutput = CoRunOutput


@dataclass
class _Generated:
    """How one student tensor is made: ``kind`` "in" (W @ P), "out" (P^T @ W), "bias_out"
    (b @ P) from a teacher tensor and a projection, or "copy" (the teacher's tensor as is).

    Tensors are looked up on their modules at use time, never held: under FSDP2 a module's
    parameter is the sharded one between forwards and the gathered one inside them.
    """

    name: str  # its key in the exported model's state_dict
    module: nn.Module | None  # None: the embedding / LM head (used directly, not installed)
    attr: str
    source: nn.Module  # the teacher module holding the teacher tensor
    source_attr: str
    kind: str
    owner: nn.Module | None  # the module holding the projection (None for "copy")
    key: str = ""

    def teacher(self) -> torch.Tensor:
        """The teacher tensor this student tensor is generated from."""
        return getattr(self.source, self.source_attr)

    def projection(self) -> nn.Parameter | None:
        """The trained projection, or None for a copied tensor."""
        return None if self.owner is None else getattr(self.owner, self.key)


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _generation_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The autocast dtype when autocast is on for ``device`` (bf16 weights come out of tensor
    cores, as the layers that use them would compute), else ``default``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def _generate(spec: _Generated, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The student tensor of ``spec``, in ``dtype`` (default: the autocast dtype under
    autocast, else the projection's)."""
    if spec.kind == "copy":
        return spec.teacher()
    p = spec.projection()
    dtype = _generation_dtype(p.device, p.dtype) if dtype is None else dtype
    # Cast both sides here rather than leave it to autocast, so that a bf16 teacher is never
    # copied to fp32 only to be cast back.
    w, p = spec.teacher().to(dtype), p.to(dtype)
    if spec.kind == "in":
        return w @ p
    if spec.kind == "out":
        return p.t() @ w
    return w @ p  # bias_out: [d_T] @ [d_T, d_S]


def _projection_grad(spec: _Generated, grad: torch.Tensor) -> torch.Tensor:
    """d loss / d P from d loss / d (generated tensor), in ``grad``'s dtype; generation is
    linear in P."""
    w = spec.teacher().to(grad.dtype)
    if spec.kind == "in":
        return w.t() @ grad
    if spec.kind == "out":
        return w @ grad.t()
    return torch.outer(w, grad)


@contextlib.contextmanager
def _gathered(module: nn.Module) -> Iterator[None]:
    """Inside, an FSDP2 unit's parameters are gathered (a no-op for any other module)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def _family_check(teacher: nn.Module) -> Any:
    config = getattr(teacher, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        got = f"model_type={model_type!r}" if model_type else f"a {type(teacher).__name__}"
        raise ValueError(
            f"LowRankClone supports teachers of the families {', '.join(SUPPORTED_FAMILIES)} "
            f"(transformers config.model_type); got {got}. Use a plain student "
            "(lrkd.models.students.FromTeacherConfig or your own class_path) for this teacher."
        )
    base = getattr(teacher, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(teacher, "lm_head"):
        raise ValueError(
            f"LowRankClone needs a transformers *ForCausalLM teacher with .model.layers and "
            f".lm_head; got {type(teacher).__name__}."
        )
    return config


def student_config_for(teacher_config: Any, hidden_size: int) -> Any:
    """The Hugging Face config of a clone: the teacher's with ``hidden_size`` and explicit
    ``head_dim`` (attention keeps the teacher's heads and head width)."""
    config = derived_config(teacher_config)
    head_dim = getattr(teacher_config, "head_dim", None) or (
        teacher_config.hidden_size // teacher_config.num_attention_heads
    )
    config.head_dim = head_dim
    config.hidden_size = hidden_size
    config.use_cache = True
    return config


def _masked_mse(
    student: torch.Tensor,
    target: torch.Tensor,
    token_mask: torch.Tensor | None,
    relative: bool = False,
) -> torch.Tensor:
    """Mean squared error over the elements of the tokens ``token_mask`` selects; with
    ``relative``, divided by the target's mean square (computed without gradient).

    Only the difference is kept for backward (not the teacher's activation).
    """
    diff = student.float() - target.float()
    if token_mask is None:
        mse = diff.pow(2).mean()
    else:
        n = token_mask.sum().clamp_min(1)
        mse = (diff.pow(2).mean(dim=-1) * token_mask).sum() / n
    if relative:
        with torch.no_grad():
            t2 = target.float().pow(2)
            power = t2.mean() if token_mask is None else (t2.mean(-1) * token_mask).sum() / n
        mse = mse / power.clamp_min(1e-12)
    return mse


class CloneBlock(nn.Module):
    """One decoder layer of a :class:`LowRankClone`: the trained projections, the student layer
    whose linear weights they generate, and (by reference) the frozen teacher layer they are
    generated from.

    The block is the clone's sharding unit under FSDP2: :meth:`LowRankClone.fully_shard`
    registers the teacher layer as the child ``teacher_layer`` first, so that one gather brings
    the teacher layer, its projections and the student layer together and the teacher is
    sharded with them. The teacher layer never appears in the block's ``state_dict``.

    Args:
        teacher_layer: the teacher's decoder layer i.
        layer: the student's decoder layer i (its linear weights are generated).
        projections: the trained projections of layer i, by linear (q, k, v, o, gate, up, down).
    """

    def __init__(
        self, teacher_layer: nn.Module, layer: nn.Module, projections: nn.ParameterDict
    ) -> None:
        super().__init__()
        self._teacher_layer = [teacher_layer]  # registered only for sharding (attach_teacher)
        self.projections = projections
        self.layer = layer
        self.specs: list[_Generated] = []
        self._taps: dict[str, torch.Tensor] | None = None
        for side, owner in (("teacher", teacher_layer), ("student", layer)):
            for path, _ in _TERM_TAPS.values():
                _get(owner, path).register_forward_hook(self._tap_hook(f"{side}.{path}"))
        exclude_from_state_dict(self, ("teacher_layer",))

    @property
    def teacher_layer_ref(self) -> nn.Module:
        """The teacher's decoder layer this block is generated from."""
        return self._teacher_layer[0]

    def attach_teacher(self) -> None:
        """Register the teacher layer as a child, so that sharding this block shards it too."""
        self.teacher_layer = self._teacher_layer[0]

    def _tap_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._taps is not None:
                self._taps[name] = output

        return hook

    def generate(self) -> dict[str, torch.Tensor]:
        """This layer's generated student tensors, by exported name."""
        return {spec.name: _generate(spec) for spec in self.specs}

    def forward(self, *args: Any, checkpointing: bool = False) -> Any:
        """Teacher layer i (no grad) and student layer i, and the clone terms between them:
        :meth:`pair`, run under activation checkpointing (recomputed in backward instead of
        storing activations) with ``checkpointing`` while gradients are on. The checkpoint is
        inside the block, so FSDP2's hooks on the block stay outside it."""
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
        terms: Sequence[str] = (),
        weights: dict[str, torch.Tensor] | None = None,
        relative: bool = False,
        target_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Run teacher layer i and student layer i on their hidden states.

        Args:
            h_s, h_t: the student's and the teacher's hidden states (``h_t`` None: student only).
            s_pos, t_pos: their rotary position embeddings.
            token_mask: 1 for real tokens (the clone losses' mean), or None.
            s_mask, t_mask: their attention masks.
            position_ids: token positions.
            terms: the clone terms to compute.
            weights: the clone's cached generated weights; ``None`` generates this layer's
                inside the autograd graph (and inside the FSDP2 gather).
            relative: divide each term by the teacher activation's mean square.
            target_grad: let gradients flow through the projection that maps the teacher's
                attention/FFN outputs into student space.

        Returns:
            The new hidden states and the clone loss of each term.
        """
        generated = self.generate() if weights is None else weights
        for spec in self.specs:
            setattr(spec.module, spec.attr, generated[spec.name])
        taps: dict[str, torch.Tensor] = {}
        self._taps = taps if terms else None
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
        for name in terms:
            path, hidden_side = _TERM_TAPS[name]
            target = taps[f"teacher.{path}"]
            if hidden_side:
                proj = self.projections[_TERM_PROJ[name]]
                with torch.set_grad_enabled(target_grad and torch.is_grad_enabled()):
                    target = target.to(proj.dtype) @ proj
            losses.append(_masked_mse(taps[f"student.{path}"], target, token_mask, relative))
        return h_s, h_t, losses


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
            teacher's normalised residual stream on a probe batch, with the teacher's norm
            gains and the residual-norm ratio folded in so the initial student computes the
            teacher restricted to that subspace; see docs/lowrank.md).
        init_std: standard deviation of the ``normal`` init.
        probe_input_ids: token ids [B, L] for ``activation_pca``; ``None`` uses
            ``probe_texts`` with the teacher's tokenizer.
        probe_texts: texts for ``activation_pca`` when no ``probe_input_ids``; ``None`` uses
            the built-in generated corpus.
        probe_tokens: about how many probe tokens ``activation_pca`` uses.
        clone_terms: which activation clone terms to compute (subset of
            ``q, k, v, gate, up, attn_out, ffn_out``); empty disables the clone loss.
        clone_loss: ``mse`` (the paper: mean squared error per term and layer) or
            ``relative_mse`` (each term's MSE divided by the teacher activation's mean square,
            so that layers with very large activations do not dominate).
        clone_target_grad: let the clone loss's gradient also flow through the projection
            that maps the teacher's attention/FFN outputs into student space (as the official
            code does). ``False`` treats the mapped teacher output as a fixed target, which
            also avoids keeping the teacher's hidden-width activations for backward.
        gradient_checkpointing: recompute each (teacher layer, student layer) pair in
            backward instead of storing the student layer's activations.
        cache_weights: generate the weights once per optimizer step (the caller must call
            :meth:`flush_weight_grads` before each optimizer step; the DistillationModule
            does). ``False`` generates them inside autograd on every forward.
        seed: seed of the ``normal`` init; ``None`` uses the global RNG.
    """

    def __init__(
        self,
        teacher: nn.Module,
        hidden_size: int,
        init: str = "normal",
        init_std: float = 0.02,
        probe_input_ids: torch.Tensor | None = None,
        probe_texts: Sequence[str] | None = None,
        probe_tokens: int = 8192,
        clone_terms: Sequence[str] = CLONE_TERMS,
        clone_loss: str = "mse",
        clone_target_grad: bool = False,
        gradient_checkpointing: bool = False,
        cache_weights: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if clone_loss not in CLONE_LOSSES:
            raise ValueError(
                f"LowRankClone: clone_loss={clone_loss!r}; choose one of {', '.join(CLONE_LOSSES)}."
            )
        self.clone_loss = clone_loss
        t_config = _family_check(teacher)
        d_teacher = t_config.hidden_size
        if not 0 < hidden_size <= d_teacher:
            raise ValueError(
                f"LowRankClone: hidden_size={hidden_size} must be between 1 and the teacher's "
                f"hidden size {d_teacher} (the clone projects the teacher's hidden side down)."
            )
        heads = t_config.num_attention_heads
        if hidden_size % heads:
            lower, upper = hidden_size // heads * heads, (hidden_size // heads + 1) * heads
            nearest = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(
                f"LowRankClone: hidden_size={hidden_size} must be a multiple of the teacher's "
                f"{heads} attention heads (transformers' config validation refuses to save or "
                f"load the exported model otherwise); nearest: {nearest}."
            )
        if init not in INITS:
            raise ValueError(f"LowRankClone: init={init!r}; choose one of {', '.join(INITS)}.")
        unknown = [t for t in clone_terms if t not in CLONE_TERMS]
        if unknown:
            raise ValueError(
                f"LowRankClone: unknown clone_terms {unknown}; "
                f"choose from {', '.join(CLONE_TERMS)}."
            )
        self._teacher = [teacher]  # a reference, deliberately not a registered submodule
        self.hidden_size = hidden_size
        self.clone_terms = tuple(clone_terms)
        self.clone_target_grad = clone_target_grad
        self.gradient_checkpointing = gradient_checkpointing
        self.cache_weights = cache_weights
        self.tied = bool(getattr(t_config, "tie_word_embeddings", False))
        self.config = student_config_for(t_config, hidden_size)

        from transformers import AutoModelForCausalLM

        attn = attention_implementation(t_config)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                self.config, attn_implementation=attn, dtype=torch.float32
            )
        device = teacher.lm_head.weight.device
        self.blocks = nn.ModuleList(
            CloneBlock(
                teacher.model.layers[i],
                layer,
                nn.ParameterDict(
                    {
                        key: nn.Parameter(torch.empty(d_teacher, hidden_size, device=device))
                        for _, key, _ in _LAYER_LINEARS
                    }
                ),
            )
            for i, layer in enumerate(skeleton.model.layers)
        )
        self.norm = skeleton.model.norm
        self.embed_projection = nn.Parameter(torch.empty(d_teacher, hidden_size, device=device))
        self.head_projection = (
            None if self.tied else nn.Parameter(torch.empty(d_teacher, hidden_size, device=device))
        )
        self.root_specs = self._build_specs(device)
        self._cache: dict[str, torch.Tensor] | None = None
        self._cache_key: tuple[Any, ...] | None = None
        exclude_from_state_dict(self, _ROOT_TEACHER_PARTS)

        if init == "normal":
            self._init_normal(init_std, seed)
        elif init == "embedding_pca":
            self._init_embedding_pca()
        else:
            self._init_activation_pca(probe_input_ids, probe_texts, probe_tokens)

    # ------------------------------------------------------------------ structure
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher this clone is generated from."""
        return self._teacher[0]

    def paired_blocks(self) -> list[nn.Module]:
        """The :class:`CloneBlock` of each layer: its output begins with (student hidden,
        teacher hidden) after the layer."""
        return list(self.blocks)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute each (teacher layer, student layer) pair in backward (non-reentrant
        ``torch.utils.checkpoint``; ``gradient_checkpointing_kwargs`` is not used)."""
        self.gradient_checkpointing = True

    @property
    def layers(self) -> list[nn.Module]:
        """The student's decoder layers (their linear weights are generated)."""
        return [block.layer for block in self.blocks]

    @property
    def projections(self) -> list[nn.ParameterDict]:
        """Per layer, the trained projections by linear (q, k, v, o, gate, up, down)."""
        return [block.projections for block in self.blocks]

    def _build_specs(self, device: torch.device) -> list[_Generated]:
        """Strip the skeleton's linear weights, record in each block how its student tensors
        are made, and return the specs of the embedding and LM head."""
        teacher = self.teacher
        for i, block in enumerate(self.blocks):
            layer, t_layer = block.layer, teacher.model.layers[i]
            for path, key, side in _LAYER_LINEARS:
                s_lin, t_lin = _get(layer, path), _get(t_layer, path)
                prefix = f"model.layers.{i}.{path}"
                del s_lin.weight
                block.specs.append(
                    _Generated(f"{prefix}.weight", s_lin, "weight", t_lin, "weight", side,
                               block.projections, key)
                )  # fmt: skip
                if t_lin.bias is not None:
                    del s_lin.bias
                    kind, owner = (
                        ("copy", None) if side == "in" else ("bias_out", block.projections)
                    )
                    block.specs.append(
                        _Generated(f"{prefix}.bias", s_lin, "bias", t_lin, "bias", kind, owner, key)
                    )
            for name in ("input_layernorm", "post_attention_layernorm"):
                norm = getattr(layer, name)
                norm.weight = nn.Parameter(torch.ones(self.hidden_size, device=device))
            for name in ("q_norm", "k_norm"):  # qwen3: head-space norms keep the teacher's gains
                if hasattr(layer.self_attn, name):
                    t_gain = getattr(t_layer.self_attn, name).weight
                    getattr(layer.self_attn, name).weight = nn.Parameter(
                        t_gain.detach().to(device=device, dtype=torch.float32).clone()
                    )
        self.norm.weight = nn.Parameter(torch.ones(self.hidden_size, device=device))
        specs = [
            _Generated("model.embed_tokens.weight", None, "", teacher.model.embed_tokens,
                       "weight", "in", self, "embed_projection")
        ]  # fmt: skip
        if self.head_projection is not None:
            specs.append(
                _Generated("lm_head.weight", None, "", teacher.lm_head, "weight", "in", self,
                           "head_projection")
            )  # fmt: skip
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if tensor.is_meta:
                raise RuntimeError(f"LowRankClone: unhandled student tensor {name}")
        return specs

    def _all_specs(self) -> list[_Generated]:
        return [spec for block in self.blocks for spec in block.specs] + self.root_specs

    def train(self, mode: bool = True) -> LowRankClone:
        """Set train/eval mode; the teacher modules registered for sharding stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

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
        forward (``cache_weights`` must be off).

        Args:
            mesh: the data-parallel device mesh (``None``: all ranks).
            mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (``None``: keep dtypes).
            reshard_after_forward: free each block's gathered weights after its forward
                (gathering again in backward), as in ZeRO-3.
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.cache_weights:
            raise ValueError(
                "LowRankClone.fully_shard: cache_weights must be False (cached weights are "
                "generated outside the forward, where sharded teacher weights are not gathered)."
            )
        kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
        for block in self.blocks:
            block.attach_teacher()
            fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
        teacher = self.teacher
        self.teacher_embed = teacher.model.embed_tokens
        self.teacher_norm = teacher.model.norm
        self.teacher_head = teacher.lm_head
        fully_shard(self, reshard_after_forward=False, **kwargs)

    # ------------------------------------------------------------------ initialisation
    def all_projections(self) -> list[nn.Parameter]:
        """Every projection parameter (per-layer ones, embedding, and LM head if untied)."""
        params = [p for d in self.projections for p in d.values()]
        params.append(self.embed_projection)
        if self.head_projection is not None:
            params.append(self.head_projection)
        return params

    @torch.no_grad()
    def _init_normal(self, std: float, seed: int | None) -> None:
        generator = None
        if seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        for p in self.all_projections():
            p.copy_(torch.randn(p.shape, generator=generator) * std)

    @torch.no_grad()
    def _init_embedding_pca(self) -> None:
        embedding = self.teacher.model.embed_tokens.weight.detach().float()
        basis = torch.linalg.svd(embedding, full_matrices=False).Vh[: self.hidden_size].t()
        for p in self.all_projections():
            p.copy_(basis)

    @torch.no_grad()
    def _init_activation_pca(
        self,
        probe_input_ids: torch.Tensor | None,
        probe_texts: Sequence[str] | None,
        probe_tokens: int,
    ) -> None:
        teacher = self.teacher
        if probe_input_ids is None:
            probe_input_ids = _probe_batch(teacher, probe_texts, probe_tokens)
        probe_input_ids = probe_input_ids.to(teacher.lm_head.weight.device)
        # Residual stream at every norm input: each layer's input (input_layernorm), the
        # midpoint (post_attention_layernorm) and the final norm's input.
        inputs: dict[str, torch.Tensor] = {}
        hooks = []
        norms: list[tuple[str, nn.Module]] = []
        for i, layer in enumerate(teacher.model.layers):
            norms.append((f"{i}.in", layer.input_layernorm))
            norms.append((f"{i}.post", layer.post_attention_layernorm))
        norms.append(("final", teacher.model.norm))
        for key, norm in norms:
            hooks.append(
                norm.register_forward_hook(
                    lambda m, a, o, key=key: inputs.__setitem__(key, a[0].detach().float())
                )
            )
        try:
            teacher(input_ids=probe_input_ids)
        finally:
            for h in hooks:
                h.remove()
        d_t = teacher.config.hidden_size

        def gain(norm: nn.Module) -> torch.Tensor:
            return norm.weight.detach().double().cpu()

        # Student coordinates h_S = U^T h_T: U is the top-d_S eigenvectors of the second
        # moment of the teacher's residual stream, each token scaled to unit norm.
        second_moment = torch.zeros(d_t, d_t, dtype=torch.float64)
        for h in inputs.values():
            h = h.reshape(-1, d_t).float().cpu()
            h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # every layer weighs the same
            second_moment += (h.t() @ h).double()
        eigvals, eigvecs = torch.linalg.eigh(second_moment)
        basis = eigvecs[:, -self.hidden_size :].flip(-1)  # U: [d_T, d_S], top direction first

        def scale(key: str) -> float:
            # RMS of the student's norm input (over d_S) over the teacher's (over d_T): folding
            # it into the projection makes the student's norm output match the teacher's.
            h = inputs[key].reshape(-1, d_t).float().cpu()
            rms_s = (h @ basis.float()).double().pow(2).sum(-1).mean() / self.hidden_size
            rms_t = h.double().pow(2).sum(-1).mean() / d_t
            return math.sqrt((rms_s / rms_t.clamp_min(1e-24)).item())

        def input_side(norm: nn.Module, key: str) -> torch.Tensor:
            return (gain(norm)[:, None] * basis * scale(key)).float()

        output_side = basis.float()
        for i, layer in enumerate(teacher.model.layers):
            proj = self.projections[i]
            p_attn = input_side(layer.input_layernorm, f"{i}.in")
            p_ffn = input_side(layer.post_attention_layernorm, f"{i}.post")
            for key in ("q", "k", "v"):
                proj[key].copy_(p_attn)
            for key in ("gate", "up"):
                proj[key].copy_(p_ffn)
            proj["o"].copy_(output_side)
            proj["down"].copy_(output_side)
        self.embed_projection.copy_(output_side)
        if self.head_projection is not None:
            self.head_projection.copy_(input_side(teacher.model.norm, "final"))
        else:
            self.norm.weight.copy_(self._tied_head_gain(inputs["final"], basis, scale("final")))
        captured = eigvals.flip(-1)[: self.hidden_size].sum() / eigvals.sum()
        log.info(
            "lrkd: activation_pca init: the top %d directions hold %.1f%% of the teacher's "
            "normalised residual-stream energy on %d probe tokens",
            self.hidden_size,
            100 * captured.item(),
            probe_input_ids.numel(),
        )

    def _tied_head_gain(self, h: torch.Tensor, basis: torch.Tensor, scale: float) -> torch.Tensor:
        """The student's final-norm gain for a tied teacher under ``activation_pca``.

        One projection U serves embedding and head, so the head computes
        E_T U diag(g_S) U^T x instead of the teacher's E_T diag(g_T) x (x the RMS-normalised
        final hidden state). g_S is the least-squares fit in the logit metric E_T^T E_T over the
        probe tokens (normal equations of a d_S-dimensional linear problem).
        """
        d_t = h.shape[-1]
        x = h.reshape(-1, d_t).double().cpu()
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        second = x.t() @ x / x.shape[0]
        embedding = self.teacher.model.embed_tokens.weight.detach().double().cpu()
        metric = embedding.t() @ embedding
        g_teacher = self.teacher.model.norm.weight.detach().double().cpu()
        lhs = (basis.t() @ second @ basis) * (basis.t() @ metric @ basis)
        rhs = torch.diagonal(basis.t() @ metric @ (g_teacher[:, None] * second) @ basis)
        ridge = 1e-8 * torch.diagonal(lhs).mean() * torch.eye(lhs.shape[0], dtype=lhs.dtype)
        gain = torch.linalg.solve(lhs + ridge, rhs)
        return (gain * scale).float()

    # ------------------------------------------------------------------ weights
    def _key(self, dtype: torch.dtype) -> tuple[Any, ...]:
        return (dtype, *((p.data_ptr(), tensor_version(p)) for p in self.all_projections()))

    def generated_weights(self) -> dict[str, torch.Tensor]:
        """Generate (or return the cached) student tensors, by their exported names.

        Under autocast (``trainer.precision: bf16-mixed``) they are generated in the autocast
        dtype, the dtype the layers would cast them to anyway: the products run on tensor
        cores, and cached weights and their gradients take half the memory of fp32 ones.
        Otherwise they take the projections' dtype.
        """
        dtype = _generation_dtype(self.embed_projection.device, self.embed_projection.dtype)
        if not self.cache_weights:
            return {spec.name: _generate(spec, dtype) for spec in self._all_specs()}
        key = self._key(dtype)
        if self._cache is not None and key == self._cache_key:
            return self._cache
        if self._cache is not None and any(w.grad is not None for w in self._cache.values()):
            what = (
                "the projections changed"
                if key[1:] != self._cache_key[1:]
                else f"the forward's dtype changed ({self._cache_key[0]} -> {dtype})"
            )
            raise RuntimeError(
                f"LowRankClone: {what} while generated-weight gradients were pending. With "
                "cache_weights=True, call flush_weight_grads() after backward and before "
                "optimizer.step() (the DistillationModule does this), and run every "
                "micro-batch of an optimizer step under the same autocast."
            )
        with torch.no_grad(), torch.autocast(self.embed_projection.device.type, enabled=False):
            cache = {}
            for spec in self._all_specs():
                tensor = _generate(spec, dtype)
                if spec.kind != "copy":
                    tensor = tensor.detach().requires_grad_(True)
                cache[spec.name] = tensor
        self._cache, self._cache_key = cache, key
        return cache

    @torch.no_grad()
    def flush_weight_grads(self) -> None:
        """Turn the gradients accumulated on cached generated weights into projection gradients.

        Call after the last backward of an optimizer step, before ``optimizer.step()``. Without
        ``cache_weights`` this does nothing.
        """
        if not self.cache_weights or self._cache is None:
            return
        for spec in self._all_specs():
            tensor = self._cache[spec.name]
            if spec.kind == "copy" or tensor.grad is None:
                continue
            # In the cache's dtype: under bf16 autocast the uncached path's backward makes dP
            # with bf16 matmuls too.
            grad = _projection_grad(spec, tensor.grad)
            p = spec.projection()
            p.grad = grad.to(p.dtype) if p.grad is None else p.grad.add_(grad.to(p.dtype))
            tensor.grad = None

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

        Returns:
            A :class:`LowRankCloneOutput`.
        """
        teacher = self.teacher
        weights = self.generated_weights() if self.cache_weights else None
        embed_w, head_w = self._embedding_and_head(weights)

        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        # Always the masked mean when there is a mask: checking for all-ones would sync the host.
        token_mask = None if attention_mask is None else attention_mask.to(torch.float32)

        # Under autocast the embedding is generated in bf16; the residual stream stays in the
        # projections' dtype (fp32 under bf16-mixed), as a plain student's would.
        h_s = F.embedding(input_ids, embed_w).to(self.embed_projection.dtype)
        s_masks = self._masks(self.config, h_s, attention_mask, position_ids)
        s_pos = teacher.model.rotary_emb(h_s, position_ids=position_ids)
        h_t = t_masks = t_pos = None
        if with_teacher:
            with torch.no_grad():
                h_t = teacher.model.embed_tokens(input_ids)
                t_masks = self._masks(teacher.config, h_t, attention_mask, position_ids)
                t_pos = teacher.model.rotary_emb(h_t, position_ids=position_ids)

        terms = self.clone_terms if with_teacher else ()
        totals: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            h_s, h_t, losses = block(
                h_s, h_t, s_pos, t_pos, token_mask, s_masks[i], t_masks[i] if t_masks else None,
                position_ids, terms, weights, self.clone_loss == "relative_mse",
                self.clone_target_grad, checkpointing=self.gradient_checkpointing,
            )  # fmt: skip
            for name, value in zip(terms, losses, strict=True):
                totals[name] = totals[name] + value if name in totals else value

        hidden = self.norm(h_s)
        teacher_hidden = None
        if with_teacher:
            with torch.no_grad():
                teacher_hidden = teacher.model.norm(h_t)
        if return_hidden:
            teacher_head = teacher.lm_head.weight if with_teacher else None
            return LowRankCloneOutput(None, None, totals, hidden, head_w, teacher_hidden,
                                      teacher_head)  # fmt: skip
        teacher_logits = None
        if with_teacher:
            with torch.no_grad():
                teacher_logits = teacher.lm_head(teacher_hidden)
        return LowRankCloneOutput(F.linear(hidden, head_w), teacher_logits, totals)

    def _embedding_and_head(
        self, weights: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's embedding and LM-head matrices (the same tensor when tied), from
        ``weights`` or generated now."""
        if weights is None:
            weights = {spec.name: _generate(spec) for spec in self.root_specs}
        embed = weights["model.embed_tokens.weight"]
        return embed, weights.get("lm_head.weight", embed)

    def _masks(
        self,
        config: Any,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> list[Any]:
        """Per-layer attention masks, made by transformers' own mask functions."""
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

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def materialize(
        self, dtype: torch.dtype = torch.float32, into: nn.Module | None = None
    ) -> nn.Module:
        """Multiply the projections out and return a plain transformers model of the teacher's
        family with ``hidden_size = d_S`` (its config carries an explicit ``head_dim``).

        Under FSDP2 (after :meth:`fully_shard`) each unit is gathered in turn, so every rank
        gets the whole student (every rank must call this together); the teacher is never
        gathered whole.

        Args:
            dtype: dtype of the new model (ignored with ``into``).
            into: a model returned by an earlier call: its weights are overwritten in place (on
                its own device and dtype) instead of building a new model, which saves the
                model construction when a fresh copy is needed every step (on-policy rollouts).
                With ``cache_weights`` the generated weights are the step's cached ones, so the
                training forward that follows does not generate them again.
        """
        model = into
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(
                copy.deepcopy(self.config), dtype=torch.float32
            )
        cached = self.generated_weights() if self.cache_weights else None
        units: list[tuple[nn.Module, nn.Module, list[_Generated], str]] = [
            (block, block.layer, block.specs, f"model.layers.{i}.")
            for i, block in enumerate(self.blocks)
        ]
        units.append((self, self.norm, self.root_specs, "model.norm."))
        loaded: set[str] = set()
        for unit, trained, specs, prefix in units:
            with _gathered(unit):  # parameters are looked up after gathering
                own = {prefix + name: p for name, p in trained.named_parameters()}
                state = {s.name: _generate(s) if cached is None else cached[s.name] for s in specs}
                state.update(own)
                # load_state_dict copies (and casts) into the model's own tensors.
                missing, unexpected = model.load_state_dict(
                    {k: v.detach() for k, v in state.items()}, strict=False
                )
                if unexpected:
                    raise RuntimeError(f"materialize: unexpected {unexpected}")
                loaded.update(state)
        missing = [k for k in model.state_dict() if k not in loaded]
        missing = [k for k in missing if not (self.tied and k == "lm_head.weight")]
        if missing:
            raise RuntimeError(f"materialize: missing {missing}")
        if self.tied:
            model.tie_weights()
        return (model if into is not None else model.to(dtype)).eval()


def _probe_batch(teacher: nn.Module, texts: Sequence[str] | None, n_tokens: int) -> torch.Tensor:
    """Token ids for the activation-PCA probe: ``texts`` (or the built-in corpus), tokenised
    with the teacher's own tokenizer, packed into rows of 256 tokens."""
    from transformers import AutoTokenizer

    source = getattr(teacher, "name_or_path", None) or getattr(teacher.config, "name_or_path", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source) if source else None
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None:
        raise ValueError(
            "LowRankClone: init=activation_pca needs probe text and the teacher's tokenizer, "
            f"but no tokenizer could be loaded from {source!r}. Give probe_input_ids, or use "
            "init=embedding_pca (no data needed)."
        )
    if texts is None:
        from lrkd.data.corpus import builtin_corpus

        texts = builtin_corpus(num_documents=max(64, n_tokens // 64), seed=1234)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= n_tokens:
            break
    row = 256
    n_rows = max(1, min(len(ids), n_tokens) // row)
    if len(ids) < row:
        return torch.tensor([ids])
    return torch.tensor(ids[: n_rows * row]).view(n_rows, row)


class LowRankCloneBuilder(StudentBuilder):
    """Builds a :class:`LowRankClone` of the teacher (use as ``model.student`` in a config).

    Args:
        hidden_size: the student's hidden size d_S (the rank), at most the teacher's and a
            multiple of its number of attention heads (e.g. 189 = 21 x 9 for SmolLM2).
        init: ``normal`` (paper), ``embedding_pca`` or ``activation_pca``; see
            :class:`LowRankClone`.
        init_std: standard deviation of the ``normal`` init.
        probe_texts: texts for ``activation_pca``; ``None`` uses the built-in corpus.
        probe_tokens: about how many probe tokens ``activation_pca`` uses.
        clone_terms: activation clone terms (``q, k, v, gate, up, attn_out, ffn_out``);
            weight them with ``model.clone_weight``.
        clone_loss: ``mse`` (paper) or ``relative_mse`` (each term over the teacher
            activation's mean square).
        clone_target_grad: let gradients flow through the projection that maps teacher
            attention/FFN outputs into student space (official code); default: fixed target.
        gradient_checkpointing: recompute each (teacher, student) layer pair in backward.
        cache_weights: generate weights once per optimizer step (recommended).
        seed: seed of the ``normal`` init.
    """

    def __init__(
        self,
        hidden_size: int,
        init: str = "normal",
        init_std: float = 0.02,
        probe_texts: list[str] | None = None,
        probe_tokens: int = 8192,
        clone_terms: list[str] | None = None,
        clone_loss: str = "mse",
        clone_target_grad: bool = False,
        gradient_checkpointing: bool = False,
        cache_weights: bool = True,
        seed: int | None = 0,
    ) -> None:
        self.kwargs = dict(
            hidden_size=hidden_size,
            init=init,
            init_std=init_std,
            probe_texts=probe_texts,
            probe_tokens=probe_tokens,
            clone_terms=tuple(CLONE_TERMS if clone_terms is None else clone_terms),
            clone_loss=clone_loss,
            clone_target_grad=clone_target_grad,
            gradient_checkpointing=gradient_checkpointing,
            cache_weights=cache_weights,
            seed=seed,
        )

    def __call__(self, teacher: nn.Module) -> LowRankClone:
        """Build the clone of ``teacher``."""
        return LowRankClone(teacher, **self.kwargs)
