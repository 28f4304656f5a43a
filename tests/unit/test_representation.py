"""Tests for lrkd.diagnostics.representation against float64 references and known values."""

from __future__ import annotations

import math

import pytest
import torch

from lrkd.diagnostics.representation import gaussian_mutual_information, linear_cka


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Reference: normalised HSIC of linear kernels with the N x N centring matrix, by hand."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k = h @ (x @ x.T) @ h
    l_ = h @ (y @ y.T) @ h
    return float(torch.trace(k @ l_) / torch.sqrt(torch.trace(k @ k) * torch.trace(l_ @ l_)))


def test_cka_self_is_one_and_returns_float64_scalar():
    x = torch.randn(300, 16, generator=_gen(0))  # float32 in, float64 out
    cka = linear_cka(x, x)
    assert cka.dtype == torch.float64
    assert cka.ndim == 0
    assert abs(float(cka) - 1.0) < 1e-12


def test_cka_invariant_to_rotation_and_isotropic_scaling():
    g = _gen(1)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 10, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        500, 10, generator=g, dtype=torch.float64
    )
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    base = float(linear_cka(x, y))
    assert 0.1 < base < 0.99  # a non-trivial value, so the invariance means something
    assert float(linear_cka(x, 3.7 * y @ q)) == pytest.approx(base, abs=1e-10)
    # A translation of either side is removed by the centring.
    assert float(linear_cka(x + 5.0, y - 2.0)) == pytest.approx(base, abs=1e-10)


def test_cka_independent_noise_is_near_zero():
    # For independent X, Y the expected linear CKA (the RV coefficient) is
    # sqrt(b_x * b_y) / (N - 1) with b = tr(S)^2 / tr(S^2); isotropic d = 8 gives b = 8, so
    # E[CKA] = 8 / 3999 = 0.0020 (over 50 seeds: mean 0.0019, sd 0.00036, max 0.0026). Note this
    # is sqrt(d1 * d2) / N, not d1 * d2 / N. 0.01 is about 20 sd above the mean.
    g = _gen(2)
    x = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    y = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    cka = float(linear_cka(x, y))
    assert 0.0 <= cka < 0.01
    assert cka < 0.02


@pytest.mark.parametrize(
    ("n", "d1", "d2"),
    [
        (12, 3, 5),  # feature-space (d x d) path
        (6, 10, 12),  # N x N path (2 N^2 < d1^2 + d1 d2 + d2^2)
        (40, 40, 1),
    ],
)
def test_cka_matches_hand_hsic_formula(n: int, d1: int, d2: int):
    g = _gen(3)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64) + 2.0
    y = x[:, :1] * torch.randn(1, d2, generator=g, dtype=torch.float64) + torch.randn(
        n, d2, generator=g, dtype=torch.float64
    )
    assert float(linear_cka(x, y)) == pytest.approx(_hsic_cka(x, y), abs=1e-10)


def test_cka_constant_input_is_zero_not_nan():
    x = torch.randn(50, 4, generator=_gen(4))
    const = torch.full((50, 3), 0.1)  # 0.1's mean is not exactly 0.1 in floating point
    assert float(linear_cka(x, const)) == 0.0
    assert float(linear_cka(const, const)) == 0.0
    # A constant column next to informative ones is simply ignored.
    with_const = torch.cat([x, torch.full((50, 1), 0.1)], dim=1)
    assert float(linear_cka(x, with_const)) == pytest.approx(1.0, abs=1e-12)


def test_cka_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        linear_cka(torch.randn(2, 3, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="same rows"):
        gaussian_mutual_information(torch.randn(10, 3), torch.randn(9, 3))


def test_gaussian_mi_bivariate_matches_closed_form():
    # I = -0.5 log(1 - rho^2) = 0.5108 nats at rho = 0.8. The estimator's relative sd at
    # N = 200000 is about 0.4% here (0.7% at rho = 0.6, over 10 seeds), so 2% is ~5 sd.
    rho, n = 0.8, 200_000
    g = _gen(5)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)
    mi = gaussian_mutual_information(x, y)
    assert mi.dtype == torch.float64 and mi.ndim == 0
    assert float(mi) == pytest.approx(-0.5 * math.log(1 - rho**2), rel=0.02)


def test_gaussian_mi_multivariate_linear_channel():
    # y = x W + e with x ~ N(0, I), e ~ N(0, I): I(X; Y) = 0.5 logdet(I + W^T W).
    g = _gen(6)
    n = 100_000
    w = 0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = x @ w + torch.randn(n, 4, generator=g, dtype=torch.float64)
    expected = 0.5 * float(torch.logdet(torch.eye(4, dtype=torch.float64) + w.T @ w))
    assert float(gaussian_mutual_information(x, y)) == pytest.approx(expected, rel=0.02)
    # Invariant to invertible linear maps of either side, unlike CKA (exactly so without the
    # ridge, which is isotropic and so does not transform along with y).
    a = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    assert float(gaussian_mutual_information(x, y @ a, ridge=0.0)) == pytest.approx(
        float(gaussian_mutual_information(x, y, ridge=0.0)), rel=1e-10
    )


def test_gaussian_mi_independent_is_near_zero():
    # Under independence 2 N I is asymptotically chi-squared with d1 * d2 = 12 degrees of
    # freedom: E[I] = 12 / (2 * 50000) = 1.2e-4, and its 99.99% quantile (~37) gives 3.7e-4.
    g = _gen(7)
    x = torch.randn(50_000, 3, generator=g, dtype=torch.float64)
    y = torch.randn(50_000, 4, generator=g, dtype=torch.float64)
    mi = float(gaussian_mutual_information(x, y))
    assert 0.0 <= mi < 5e-4


def test_gaussian_mi_identical_is_large_and_capped_by_ridge():
    g = _gen(8)
    x = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    # For isotropic x, y = x gives 0.5 d log((1 + r)^2 / (2 r + r^2)) = 26.24 nats at r = 1e-6.
    cap = 4 * 0.5 * math.log((1 + 1e-6) ** 2 / (2e-6 + 1e-12))
    exact = float(gaussian_mutual_information(x, x))
    noisy = float(
        gaussian_mutual_information(x, x + 1e-6 * torch.randn(2000, 4, generator=g, dtype=x.dtype))
    )
    assert math.isfinite(exact)
    assert exact == pytest.approx(cap, rel=0.01)
    assert noisy > 20.0
    # Without the ridge the (noisy) estimate is bounded only by the noise level.
    assert (
        float(
            gaussian_mutual_information(
                x, x + 1e-3 * x.std() * torch.randn(2000, 4, generator=g, dtype=x.dtype), ridge=0.0
            )
        )
        > 20.0
    )


def test_gaussian_mi_constant_input_and_bad_ridge():
    x = torch.randn(100, 2, generator=_gen(9))
    assert float(gaussian_mutual_information(x, torch.full((100, 3), 0.1))) == pytest.approx(
        0.0, abs=1e-12
    )
    with pytest.raises(ValueError, match="ridge"):
        gaussian_mutual_information(x, x, ridge=-1.0)
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_mutual_information(x, torch.full((100, 1), 0.1), ridge=0.0)
