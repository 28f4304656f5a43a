"""FSDP2 sharding of a Low-Rank Clone together with its teacher.

Each :class:`~lrkd.models.lowrank.CloneBlock` (teacher layer i, its projections, student layer
i) is one FSDP2 unit; the clone itself is the root unit, holding the projections of the
embedding and head, the final norm gain, and the teacher's embedding, final norm and LM head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from lrkd.models.lowrank.clone import LowRankClone

__all__ = ["ROOT_TEACHER_PARTS", "fully_shard", "gathered", "sharded"]

ROOT_TEACHER_PARTS: tuple[str, ...] = ("teacher_embed", "teacher_norm", "teacher_head")
"""The teacher's modules outside its layers that a sharded clone registers as children (and
leaves out of its ``state_dict``)."""


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Inside, an FSDP2 unit's parameters are gathered (a no-op for any other module).

    Args:
        module: an FSDP2 unit, or any module.

    Yields:
        Nothing; the parameters are resharded on exit.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


@contextlib.contextmanager
def sharded(module: nn.Module) -> Iterator[None]:
    """Inside, an FSDP2 unit's parameters are its sharded DTensors in their own dtype (the
    unit is resharded first; a no-op for any other module), for :func:`weights.full_tensor`.

    Args:
        module: an FSDP2 unit, or any module.

    Yields:
        Nothing.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.reshard()
    yield


def fully_shard(
    clone: LowRankClone,
    mesh: Any = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> None:
    """Shard ``clone`` and its teacher with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    Every teacher parameter is sharded, and one gather brings a layer's teacher weights together
    with the projections that generate the student's. Weights are then generated inside the
    forward (``cache_weights`` must be off).

    Args:
        clone: the clone (not sharded yet).
        mesh: the data-parallel device mesh (``None``: all ranks).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (``None``: keep dtypes).
        reshard_after_forward: free each block's gathered weights after its forward (gathering
            again in backward), as in ZeRO-3.

    Raises:
        ValueError: the clone caches its generated weights.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as fsdp_fully_shard

    if clone.cache_weights:
        raise ValueError(
            "LowRankClone.fully_shard: cache_weights must be False (cached weights are "
            "generated outside the forward, where sharded teacher weights are not gathered)."
        )
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in clone.blocks:
        block.attach_teacher()
        fsdp_fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    teacher = clone.teacher
    clone.teacher_embed = teacher.model.embed_tokens
    clone.teacher_norm = teacher.model.norm
    clone.teacher_head = teacher.lm_head
    fsdp_fully_shard(clone, reshard_after_forward=False, **kwargs)
