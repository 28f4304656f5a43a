"""Gradient signal-to-noise ratio across examples, accumulated without storing the gradients.

Given per-example gradients ``g_1, ..., g_n`` (for instance the distillation-loss gradient of
each problem within one pass-rate bucket), with mean ``g_bar``:

* ``mean_norm = ||g_bar||``: the length of the common direction the examples agree on;
* ``spread = sqrt(sum_i ||g_i - g_bar||^2 / (n - 1))``: the square root of the unbiased estimate
  of ``tr(Sigma)``, the total per-example variance around that mean;
* ``snr = mean_norm / spread`` and ``snr_debiased``, which corrects for ``g_bar`` itself being
  noisy: ``E ||g_bar||^2 = ||mu||^2 + tr(Sigma) / n``, so
  ``sqrt(max(||g_bar||^2 - spread^2 / n, 0)) / spread`` estimates ``||mu|| / sqrt(tr Sigma)``
  without the upward bias of ``snr`` at small ``n``.

Why a distillation user would log it: the PACED observation is that problems at intermediate pass
rates give the most *consistent* gradient signal. Problems the student always solves contribute
gradients that are small and point nowhere in particular, problems it never solves contribute
large but mutually inconsistent ones, and those in between agree on a direction. Logging the SNR
per pass-rate bucket checks that claim on your own teacher/student pair and tells you whether the
pacing schedule is sampling where the signal is.

Memory: :class:`SNRAccumulator` keeps two float64 vectors of the gradient's size (a shift and a
running sum) and one float64 scalar, on the gradients' device, however many examples are added,
so per-example gradients of millions of parameters never have to be held together.

Numerics: ``sum_i ||g_i - g_bar||^2`` is computed as ``sum_i ||g_i||^2 - n ||g_bar||^2`` in
float64. That difference cancels catastrophically when the spread is tiny compared with the mean
(high SNR), so it is applied to the shifted gradients ``g_i - g_1`` (the spread does not depend on
a shift, and the first example is a far better origin than zero): identical gradients then give a
spread of exactly 0, and the remaining rounding error is relative to ``sum_i ||g_i - g_1||^2``
rather than to ``sum_i ||g_i||^2``. The difference is still clamped at 0. Gradients are cast to
float64 before any arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GradientSNR", "SNRAccumulator", "gradient_snr"]


@dataclass(frozen=True)
class GradientSNR:
    """Signal-to-noise statistics of a set of per-example gradients.

    Attributes:
        count: Number of examples ``n``.
        mean_norm: ``||g_bar||``, the norm of the mean gradient.
        spread: ``sqrt(sum_i ||g_i - g_bar||^2 / (n - 1))``, the square root of the unbiased
            estimate of the trace of the per-example gradient covariance.
        snr: ``mean_norm / spread``; ``inf`` if ``spread == 0 < mean_norm`` and 0 if both are 0.
        snr_debiased: ``sqrt(max(mean_norm^2 - spread^2 / n, 0)) / spread``, an estimate of
            ``||mu|| / sqrt(tr Sigma)`` that removes the ``tr(Sigma) / n`` that the noise in
            ``g_bar`` adds to ``E ||g_bar||^2``; same conventions as ``snr`` when ``spread == 0``.
    """

    count: int
    mean_norm: float
    spread: float
    snr: float
    snr_debiased: float


def _ratio(num: float, den: float) -> float:
    """``num / den`` with ``x / 0 = inf`` for ``x > 0`` and ``0 / 0 = 0``."""
    if den > 0:
        return num / den
    return math.inf if num > 0 else 0.0


class SNRAccumulator:
    """Streaming accumulator for :class:`GradientSNR`, one example's gradient at a time.

    Example:
        >>> acc = SNRAccumulator()
        >>> for problem in bucket:  # doctest: +SKIP
        ...     model.zero_grad()
        ...     loss_of(problem).backward()
        ...     acc.add(torch.cat([p.grad.flatten() for p in model.parameters()]))
        >>> stats = acc.result()  # doctest: +SKIP
    """

    def __init__(self) -> None:
        """Starts empty; the gradient size and device are fixed by the first :meth:`add`."""
        self._count = 0
        self._shift: torch.Tensor | None = None  # g_1, float64 [P]
        self._sum: torch.Tensor | None = None  # sum_i (g_i - g_1), float64 [P]
        self._sum_sq: torch.Tensor | None = None  # sum_i ||g_i - g_1||^2, float64 0-dim

    @property
    def count(self) -> int:
        """Number of examples added so far."""
        return self._count

    def _rows(self, grads: torch.Tensor) -> torch.Tensor:
        """Shifted float64 ``[k, P]`` rows; fixes the shift and size on the first call."""
        if self._shift is None:
            if grads.shape[1] == 0:
                raise ValueError("gradients must have at least one element")
            self._shift = grads[0].clone()
            self._sum = torch.zeros_like(self._shift)
            self._sum_sq = torch.zeros((), dtype=torch.float64, device=grads.device)
        elif grads.shape[1] != self._shift.numel():
            raise ValueError(
                f"every gradient must have {self._shift.numel()} elements; got {grads.shape[1]}"
            )
        return grads.to(self._shift.device) - self._shift

    def add(self, grad: torch.Tensor) -> None:
        """Adds one example's gradient.

        Args:
            grad: The gradient of one example, any shape (it is flattened) and float dtype; every
                call must pass the same number of elements.

        Raises:
            ValueError: If the number of elements differs from the first gradient's or is 0.
        """
        rows = self._rows(grad.detach().reshape(1, -1).to(torch.float64))
        self._sum += rows[0]
        self._sum_sq += rows[0].square().sum()
        self._count += 1

    def add_batch(self, grads: torch.Tensor) -> None:
        """Adds several examples' gradients at once (equivalent to :meth:`add` on each row).

        Args:
            grads: ``[k, ...]`` gradients of ``k`` examples; each ``grads[i]`` is flattened.

        Raises:
            ValueError: If ``grads`` is 0-dim or its per-example size differs from the first
                gradient's or is 0.
        """
        if grads.ndim == 0:
            raise ValueError("grads must have a leading example dimension")
        if grads.shape[0] == 0:
            return
        rows = self._rows(grads.detach().reshape(grads.shape[0], -1).to(torch.float64))
        self._sum += rows.sum(dim=0)
        self._sum_sq += rows.square().sum()
        self._count += rows.shape[0]

    def result(self) -> GradientSNR:
        """Computes the statistics of the examples added so far (the accumulator is unchanged).

        Returns:
            The :class:`GradientSNR` of the added gradients.

        Raises:
            ValueError: With fewer than 2 examples (the spread is undefined).
        """
        if self._count < 2 or self._shift is None:
            raise ValueError(f"need at least 2 examples for a gradient SNR; got {self._count}")
        n = self._count
        mean_shifted = self._sum / n  # g_bar - g_1
        # sum_i ||d_i - d_bar||^2 = sum_i ||d_i||^2 - n ||d_bar||^2 with d_i = g_i - g_1.
        scatter = max(float(self._sum_sq - n * mean_shifted.square().sum()), 0.0)
        spread = math.sqrt(scatter / (n - 1))
        mean_norm = float(torch.linalg.vector_norm(self._shift + mean_shifted))
        signal = math.sqrt(max(mean_norm * mean_norm - spread * spread / n, 0.0))
        return GradientSNR(
            count=n,
            mean_norm=mean_norm,
            spread=spread,
            snr=_ratio(mean_norm, spread),
            snr_debiased=_ratio(signal, spread),
        )


def gradient_snr(grads: torch.Tensor) -> GradientSNR:
    """Gradient SNR of per-example gradients given all at once.

    Uses :class:`SNRAccumulator` (with the first row as the shift, like adding the rows one at a
    time), so the results agree with the streaming path up to float64 summation order.

    Args:
        grads: ``[n, P]`` gradients, one example per row (``[n, ...]`` is flattened per example).

    Returns:
        The :class:`GradientSNR` of the rows.

    Raises:
        ValueError: With fewer than 2 rows.
    """
    acc = SNRAccumulator()
    acc.add_batch(grads)
    return acc.result()
