"""How much of the teacher's representation the student shares: linear CKA and Gaussian MI.

Both functions compare two sets of features taken on the **same** ``N`` rows (tokens), for example
the teacher's and the student's hidden states at matched layers, flattened to ``[N, d_teacher]``
and ``[N, d_student]``. The widths may differ, so neither needs a projection between the spaces.

* :func:`linear_cka` is the linear centred kernel alignment of Kornblith et al. (2019),

  ``CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)``  (columns centred),

  a number in ``[0, 1]`` that is invariant to orthogonal transformations and isotropic scaling of
  either side (not to arbitrary invertible linear maps). For a distillation run it says how much
  of the teacher's representation the student shares *linearly*: a low-rank clone student whose
  hidden states are a learned projection of the teacher's should sit near 1 at matched layers,
  and a drop during training shows the student drifting away from the teacher's geometry even
  while the token-level KL still falls. Under independence its expected value is small but not
  zero: ``sqrt(b_x * b_y) / (N - 1)`` with ``b = tr(S)^2 / tr(S^2)`` (the effective
  dimensionality; ``b = d`` for isotropic features), i.e. ``sqrt(d1 * d2) / N`` at most, so use
  ``N`` well above the widths before reading small values.
* :func:`gaussian_mutual_information` is the mutual information ``I(X; Y)`` in nats of a joint
  Gaussian fitted to the rows, ``0.5 * (logdet S_x + logdet S_y - logdet S_xy)``. Unlike CKA it
  is invariant to *any* invertible linear map of either side, so it measures how much linearly
  decodable information about one representation the other carries, whatever its basis or scale.
  It is an estimate that needs ``N >> d1 + d2``: with ``d1 + d2`` comparable to ``N`` the
  sample covariance is (nearly) singular and the value is dominated by the ridge, and under
  independence it is biased upward by about ``d1 * d2 / (2 N)`` (``2 N I`` is then
  asymptotically chi-squared with ``d1 * d2`` degrees of freedom).

Everything is computed in float64 on the inputs' device and comes back as a 0-dim float64 tensor;
the inputs are not modified. Neither function is meant to be differentiated through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["gaussian_mutual_information", "linear_cka"]


def _as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """Returns ``x`` as a float64 ``[N, d]`` matrix (a 1-D input is one feature)."""
    if x.ndim == 1:
        x = x.unsqueeze(1)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, d] (or [N]); got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _check_rows(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raises ``ValueError`` unless ``x`` and ``y`` have the same ``N >= 2`` rows."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same rows (the same tokens); got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 rows; got {x.shape[0]}")


def _centre(x: torch.Tensor) -> torch.Tensor:
    """Subtracts the column means; columns that are exactly constant become exactly zero.

    The mean of a constant column is not always that constant in floating point (``0.1 + 0.1 +
    0.1 != 0.3``), which would leave rounding noise of order ``1e-17`` that the scale-invariant
    CKA would happily normalise up to a meaningless value; zeroing those columns keeps a
    zero-variance input at CKA 0.
    """
    constant = x.amax(dim=0) == x.amin(dim=0)
    return (x - x.mean(dim=0)).masked_fill(constant, 0.0)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear centred kernel alignment between two representations of the same rows.

    ``CKA = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)`` with the columns of ``X`` and ``Y``
    centred, in float64. It equals the normalised HSIC of the linear kernels
    ``tr(K L) / (||K||_F ||L||_F)`` with ``K = X X^T`` and ``L = Y Y^T`` (both doubly centred),
    but for ``N`` much larger than the widths it is computed in feature space from ``d x d``
    matrices, never an ``N x N`` Gram matrix; the ``N x N`` form is used only when it is the
    smaller one (``2 N^2 < d1^2 + d1 d2 + d2^2``, e.g. a few hundred tokens of wide hidden states).

    Args:
        x: ``[N, d1]`` features (a 1-D ``[N]`` tensor is one feature), any float dtype and device.
        y: ``[N, d2]`` features of the same ``N`` rows in the same order.

    Returns:
        A 0-dim float64 tensor in ``[0, 1]`` on the inputs' device; 1 when ``y`` is an orthogonal
        transformation and isotropic scaling of ``x`` (after centring). A zero-variance
        (constant) ``x`` or ``y`` gives 0, not nan.

    Raises:
        ValueError: If the row counts differ, ``N < 2``, or an input is not 1-D or 2-D.
    """
    x = _as_rows(x, "x")
    y = _as_rows(y, "y")
    _check_rows(x, y)
    x, y = _centre(x), _centre(y)
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if 2 * n * n < d1 * d1 + d1 * d2 + d2 * d2:
        k, l_ = x @ x.T, y @ y.T
        num = (k * l_).sum()
        den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)
    else:
        num = (y.T @ x).square().sum()
        den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    positive = den > 0
    cka = torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), 0.0)
    return cka.clamp(0.0, 1.0)


def _logdet_pd(s: torch.Tensor) -> torch.Tensor:
    """``log det`` of a symmetric positive-definite matrix via its Cholesky factor."""
    factor, info = torch.linalg.cholesky_ex(s)
    if int(info) != 0:
        raise ValueError(
            "the covariance is not positive definite (a zero-variance input with ridge=0, or "
            "N <= d1 + d2); use ridge > 0 and more rows"
        )
    return 2.0 * torch.log(torch.diagonal(factor)).sum()


def gaussian_mutual_information(
    x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-6
) -> torch.Tensor:
    """Mutual information ``I(X; Y)`` in nats under a joint Gaussian fitted to the rows.

    ``I = 0.5 * (logdet S_x + logdet S_y - logdet S)`` with ``S = [[S_x, S_xy], [S_yx, S_y]]`` the
    sample covariance of the concatenated, centred rows, in float64. For stability
    ``ridge * mean(diag S_x)`` is added to the diagonal of the ``x`` block and
    ``ridge * mean(diag S_y)`` to that of the ``y`` block (``ridge`` itself for a block with zero
    variance), the same amounts in the marginal and the joint covariance, so the regularised
    marginals are exactly the diagonal blocks of the regularised joint and the estimate is never
    negative (Fischer's inequality). The ridge caps the value: even ``y = x`` gives a finite
    ``0.5 * d * log((1 + ridge)^2 / (2 ridge + ridge^2))``, about ``6.56 * d`` nats at the default.

    This is an estimate that needs ``N >> d1 + d2``: with fewer rows the sample covariance is
    (nearly) singular and the ridge dominates, and under independence the estimate is biased
    upward by about ``d1 * d2 / (2 N)``. It is exact only for jointly Gaussian data; otherwise it
    is the information carried by the linear (second-order) dependence alone.

    Args:
        x: ``[N, d1]`` features (a 1-D ``[N]`` tensor is one feature), any float dtype and device.
        y: ``[N, d2]`` features of the same ``N`` rows in the same order.
        ridge: Relative diagonal regulariser, ``>= 0``.

    Returns:
        A 0-dim float64 tensor (nats, ``>= 0``) on the inputs' device.

    Raises:
        ValueError: If the row counts differ, ``N < 2``, an input is not 1-D or 2-D, ``ridge`` is
            negative, or the regularised covariance is not positive definite (only possible with
            ``ridge == 0``).
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0; got {ridge}")
    x = _as_rows(x, "x")
    y = _as_rows(y, "y")
    _check_rows(x, y)
    n, d1 = x.shape[0], x.shape[1]
    z = torch.cat([x - x.mean(dim=0), y - y.mean(dim=0)], dim=1)
    cov = (z.T @ z) / (n - 1)
    diag = torch.diagonal(cov)
    scales = []
    for block in (diag[:d1], diag[d1:]):
        mean = block.mean()
        scales.append(torch.where(mean > 0, mean, torch.ones_like(mean)).expand_as(block))
    cov = cov + torch.diag(ridge * torch.cat(scales))
    mi = 0.5 * (_logdet_pd(cov[:d1, :d1]) + _logdet_pd(cov[d1:, d1:]) - _logdet_pd(cov))
    return mi.clamp_min(0.0)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def layer_outputs(
    modules: Sequence[nn.Module], pick: Callable[[Any], Any] = _first
) -> Iterator[list[Any]]:
    """Record what ``modules`` return while inside the block (forward hooks, removed on exit).

    Args:
        modules: the modules to watch, e.g. a decoder's ``model.layers``.
        pick: maps a module's output to what is kept; the default keeps the first element of
            a tuple (a decoder layer's hidden states) or the tensor itself.

    Yields:
        The list the picked outputs are appended to, in call order.
    """
    outputs: list[Any] = []
    handles = [
        m.register_forward_hook(lambda _m, _args, out: outputs.append(pick(out))) for m in modules
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
