"""Generated weights: how each student tensor of a Low-Rank Clone is made from the teacher's.

A :class:`GeneratedTensor` records, for one tensor of the exported student, the teacher tensor
it comes from, the trained projection that maps it, and which side of the teacher tensor is the
hidden side. :func:`generate` makes the tensor; :func:`projection_grad` turns a gradient with
respect to the generated tensor into the gradient with respect to the projection (generation is
linear in the projection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "LAYER_LINEARS",
    "GeneratedTensor",
    "generate",
    "generation_dtype",
    "projection_grad",
]

LAYER_LINEARS: tuple[tuple[str, str, str], ...] = (
    ("self_attn.q_proj", "q", "in"),
    ("self_attn.k_proj", "k", "in"),
    ("self_attn.v_proj", "v", "in"),
    ("self_attn.o_proj", "o", "out"),
    ("mlp.gate_proj", "gate", "in"),
    ("mlp.up_proj", "up", "in"),
    ("mlp.down_proj", "down", "out"),
)
"""The generated linears of a decoder layer: (module path inside the layer, projection key,
side). Side ``"in"``: the hidden side is the weight's input (``W_S = W_T @ P``); ``"out"``: it
is the weight's output (``W_S = P^T @ W_T``)."""


@dataclass
class GeneratedTensor:
    """How one student tensor is made from a teacher tensor.

    ``kind`` is ``"in"`` (``W @ P``), ``"out"`` (``P^T @ W``), ``"bias_out"`` (``b @ P``), or
    ``"copy"`` (the teacher's tensor as is).

    Tensors are looked up on their modules at use time, never held: under FSDP2 a module's
    parameter is the sharded one between forwards and the gathered one inside them.

    Attributes:
        name: its key in the exported model's ``state_dict``.
        module: the student module it is installed on (``None``: the embedding or LM head,
            which are used directly, not installed).
        attr: its attribute name on ``module``.
        source: the teacher module holding the teacher tensor.
        source_attr: the teacher tensor's attribute name on ``source``.
        kind: ``"in"``, ``"out"``, ``"bias_out"`` or ``"copy"``.
        owner: the module holding the projection (``None`` for ``"copy"``).
        key: the projection's attribute name (or ``ParameterDict`` key) on ``owner``.
        generations: how many times :func:`generate` has made this tensor (a counter for
            tests and benchmarks: once per forward, or once per optimizer step when cached).
    """

    name: str
    module: nn.Module | None
    attr: str
    source: nn.Module
    source_attr: str
    kind: str
    owner: nn.Module | None
    key: str = ""
    generations: int = field(default=0, compare=False)

    def teacher(self) -> torch.Tensor:
        """The teacher tensor this student tensor is generated from."""
        return getattr(self.source, self.source_attr)

    def projection(self) -> nn.Parameter | None:
        """The trained projection, or None for a copied tensor."""
        return None if self.owner is None else getattr(self.owner, self.key)


def generation_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype to generate weights in.

    Args:
        device: the projections' device.
        default: the dtype outside autocast (the projections').

    Returns:
        The autocast dtype when autocast is on for ``device`` (bf16 weights come out of tensor
        cores, as the layers that use them would compute), else ``default``.
    """
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a DTensor, e.g. an FSDP2 parameter outside its
    unit's gather: all ranks must call this together), in its own dtype; any other tensor as it
    is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def generate(
    spec: GeneratedTensor, dtype: torch.dtype | None = None, full: bool = False
) -> torch.Tensor:
    """Make the student tensor of ``spec``.

    Args:
        spec: the tensor's recipe.
        dtype: the dtype to compute in; ``None`` is the autocast dtype under autocast, else the
            projection's. Ignored for a copied tensor (returned as the teacher's).
        full: read sharded (FSDP2) tensors whole, in their own dtype (:func:`full_tensor`),
            instead of as they are (gathered, in the mixed-precision dtype, inside a forward).

    Returns:
        The generated tensor (in the autograd graph of the projection when grad is enabled).
    """
    spec.generations += 1
    read = full_tensor if full else (lambda tensor: tensor)
    if spec.kind == "copy":
        # Detached: a Parameter set on the student layer would register the teacher's tensor
        # as a student parameter (in its state_dict, and dangling once FSDP2 reshards it).
        return read(spec.teacher()).detach()
    p = read(spec.projection())
    dtype = generation_dtype(p.device, p.dtype) if dtype is None else dtype
    # Cast both sides here rather than leave it to autocast, so that a bf16 teacher is never
    # copied to fp32 only to be cast back.
    w, p = read(spec.teacher()).to(dtype), p.to(dtype)
    if spec.kind == "in":
        return w @ p
    if spec.kind == "out":
        return p.t() @ w
    return w @ p  # bias_out: [d_T] @ [d_T, d_S]


def projection_grad(spec: GeneratedTensor, grad: torch.Tensor) -> torch.Tensor:
    """d loss / d P from d loss / d (generated tensor); generation is linear in P.

    Args:
        spec: the tensor's recipe (not a copied tensor).
        grad: the gradient with respect to the generated tensor.

    Returns:
        The projection's gradient, in ``grad``'s dtype.
    """
    w = spec.teacher().to(grad.dtype)
    if spec.kind == "in":
        return w.t() @ grad
    if spec.kind == "out":
        return w @ grad.t()
    return torch.outer(w, grad)
