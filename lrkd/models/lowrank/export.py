"""Export of a Low-Rank Clone: multiply the projections out into a plain transformers model."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrkd.models.lowrank.sharding import gathered, sharded
from lrkd.models.lowrank.weights import GeneratedTensor, full_tensor, generate

if TYPE_CHECKING:
    from lrkd.models.lowrank.clone import LowRankClone

__all__ = ["materialize"]


@torch.no_grad()
def materialize(
    clone: LowRankClone, dtype: torch.dtype = torch.float32, into: nn.Module | None = None
) -> nn.Module:
    """A plain transformers model of the teacher's family with ``hidden_size = d_S``.

    Under FSDP2 every rank gets the whole student (every rank must call this together), made
    unit by unit, so the teacher is never gathered whole. A new model is made from the
    parameters' own dtype (the fp32 masters under ``bf16-mixed``, as ``lrkd export`` reads them
    from a checkpoint), one tensor at a time; ``into`` is refreshed from each unit's gather (in
    the mixed-precision dtype, one collective per unit: the per-step rollout copy).

    Args:
        clone: the clone.
        dtype: dtype of the new model (ignored with ``into``).
        into: a model returned by an earlier call: its weights are overwritten in place (on its
            own device and dtype) instead of building a new model. With ``cache_weights`` the
            generated weights are the step's cached ones.

    Returns:
        The model, in eval mode; its config carries an explicit ``head_dim``.

    Raises:
        RuntimeError: the clone's tensors and the model's ``state_dict`` do not match.
    """
    model = into
    if model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(copy.deepcopy(clone.config), dtype=torch.float32)
    cached = clone.generated_weights() if clone.cache_weights else None
    units: list[tuple[nn.Module, nn.Module, list[GeneratedTensor], str]] = [
        (block, block.layer, block.specs, f"model.layers.{i}.")
        for i, block in enumerate(clone.blocks)
    ]
    units.append((clone, clone.norm, clone.root_specs, "model.norm."))
    loaded: set[str] = set()
    full = into is None
    for unit, trained, specs, prefix in units:
        with sharded(unit) if full else gathered(unit):  # parameters are looked up inside
            own = {prefix + name: full_tensor(p) for name, p in trained.named_parameters()}
            state = {s.name: generate(s, full=full) if cached is None else cached[s.name]
                     for s in specs}  # fmt: skip
            state.update(own)
            # load_state_dict copies (and casts) into the model's own tensors.
            missing, unexpected = model.load_state_dict(
                {k: v.detach() for k, v in state.items()}, strict=False
            )
            if unexpected:
                raise RuntimeError(f"materialize: unexpected {unexpected}")
            loaded.update(state)
    missing = [k for k in model.state_dict() if k not in loaded]
    missing = [k for k in missing if not (clone.tied and k == "lm_head.weight")]
    if missing:
        raise RuntimeError(f"materialize: missing {missing}")
    if clone.tied:
        model.tie_weights()
    return (model if into is not None else model.to(dtype)).eval()
