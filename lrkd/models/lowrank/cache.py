"""The generated-weight cache of a Low-Rank Clone: weights made once per optimizer step.

With ``cache_weights=True`` the clone's student tensors are generated once per optimizer step,
outside the autograd graph, as leaf tensors that accumulate gradients over the step's
micro-batches; :meth:`WeightCache.flush` turns those gradients into projection gradients once,
just before the optimizer step. The cache is valid while the projections (their storage and
version counter) and the forward's dtype stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lrkd._compat import tensor_version
from lrkd.models.lowrank.weights import GeneratedTensor, generate, projection_grad

__all__ = ["WeightCache"]


class WeightCache:
    """The student tensors generated for the current optimizer step, and their gradients.

    Attributes:
        weights: the cached tensors by exported name (``None`` before the first fill). Generated
            ones are leaf tensors that require grad; copied ones are the teacher's tensors.
    """

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] | None = None
        self._key: tuple[Any, ...] | None = None

    @staticmethod
    def key(dtype: torch.dtype, projections: Sequence[nn.Parameter]) -> tuple[Any, ...]:
        """What the cached weights depend on: ``dtype`` and each projection's storage and
        version (an optimizer step changes the version)."""
        return (dtype, *((p.data_ptr(), tensor_version(p)) for p in projections))

    def get(
        self,
        specs: Sequence[GeneratedTensor],
        projections: Sequence[nn.Parameter],
        dtype: torch.dtype,
        device_type: str,
    ) -> dict[str, torch.Tensor]:
        """The cached weights, generated anew when the projections or ``dtype`` changed.

        Args:
            specs: every generated student tensor.
            projections: every projection (the cache key).
            dtype: the dtype to generate in.
            device_type: the projections' device type (autocast is turned off there while
                generating).

        Returns:
            The weights by exported name.

        Raises:
            RuntimeError: the weights would be regenerated while gradients accumulated on the
                cached ones were not flushed into the projections yet.
        """
        key = self.key(dtype, projections)
        if self.weights is not None and key == self._key:
            return self.weights
        if self.weights is not None and any(w.grad is not None for w in self.weights.values()):
            what = (
                "the projections changed"
                if key[1:] != self._key[1:]
                else f"the forward's dtype changed ({self._key[0]} -> {dtype})"
            )
            raise RuntimeError(
                f"LowRankClone: {what} while generated-weight gradients were pending. With "
                "cache_weights=True, call flush_weight_grads() after backward and before "
                "optimizer.step() (the DistillationModule does this), and run every "
                "micro-batch of an optimizer step under the same autocast."
            )
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            weights = {}
            for spec in specs:
                tensor = generate(spec, dtype)
                if spec.kind != "copy":
                    tensor = tensor.detach().requires_grad_(True)
                weights[spec.name] = tensor
        self.weights, self._key = weights, key
        return weights

    @torch.no_grad()
    def flush(self, specs: Sequence[GeneratedTensor]) -> None:
        """Add the gradients accumulated on the cached weights to the projections' gradients
        (and clear them). Does nothing before the first fill.

        Args:
            specs: every generated student tensor.
        """
        if self.weights is None:
            return
        for spec in specs:
            tensor = self.weights[spec.name]
            if spec.kind == "copy" or tensor.grad is None:
                continue
            # In the cache's dtype: under bf16 autocast the uncached path's backward makes dP
            # with bf16 matmuls too.
            grad = projection_grad(spec, tensor.grad)
            p = spec.projection()
            p.grad = grad.to(p.dtype) if p.grad is None else p.grad.add_(grad.to(p.dtype))
            tensor.grad = None
