"""Tests for lrkd.diagnostics.snr against synthetic gradients with known statistics."""

from __future__ import annotations

import math

import pytest
import torch

from lrkd.diagnostics.snr import GradientSNR, SNRAccumulator, gradient_snr


def _synthetic(n: int, p: int, mu_norm: float, sigma: float, seed: int) -> torch.Tensor:
    """g_i = mu + sigma * z_i with ||mu|| = mu_norm and z_i ~ N(0, I_P)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(p, generator=g, dtype=torch.float64)
    mu = mu_norm * mu / mu.norm()
    return mu + sigma * torch.randn(n, p, generator=g, dtype=torch.float64)


def test_synthetic_gradients_recover_known_spread_and_snr():
    # tr(Sigma) = sigma^2 P, so spread -> sigma sqrt(P) = 3.536 (relative sd ~ 1/sqrt(2 n P)
    # = 0.35%) and snr_debiased -> ||mu|| / (sigma sqrt(P)) = 0.566 (relative sd ~ 0.6%).
    n, p, mu_norm, sigma = 2000, 50, 2.0, 0.5
    stats = gradient_snr(_synthetic(n, p, mu_norm, sigma, seed=0))
    assert stats.count == n
    assert stats.spread == pytest.approx(sigma * math.sqrt(p), rel=0.03)
    assert stats.snr_debiased == pytest.approx(mu_norm / (sigma * math.sqrt(p)), rel=0.05)
    # E ||g_bar||^2 = ||mu||^2 + tr(Sigma) / n.
    assert stats.mean_norm**2 == pytest.approx(mu_norm**2 + sigma**2 * p / n, rel=0.05)
    assert stats.snr == pytest.approx(stats.mean_norm / stats.spread, rel=1e-15)


def test_pure_noise_snr_sits_at_the_noise_floor():
    # mu = 0: ||g_bar||^2 ~ tr(Sigma) chi2_P / (n P), so snr ~ 1 / sqrt(n) (relative sd about
    # sqrt(2 / P) / 2 = 10% at P = 50) while snr_debiased removes exactly that floor.
    n = 400
    stats = gradient_snr(_synthetic(n, 50, 0.0, 1.0, seed=1))
    assert stats.snr == pytest.approx(1 / math.sqrt(n), rel=0.35)
    assert stats.snr_debiased < stats.snr


def test_two_examples_by_hand():
    g1 = torch.tensor([1.0, 2.0, 2.0])
    g2 = torch.tensor([3.0, 2.0, -2.0])
    # g_bar = [2, 2, 0]: ||g_bar||^2 = 8; deviations [-1, 0, 2] and [1, 0, -2]: scatter 10.
    stats = gradient_snr(torch.stack([g1, g2]))
    assert stats == GradientSNR(
        count=2,
        mean_norm=pytest.approx(math.sqrt(8.0), rel=1e-15),
        spread=pytest.approx(math.sqrt(10.0), rel=1e-15),
        snr=pytest.approx(math.sqrt(0.8), rel=1e-15),
        snr_debiased=pytest.approx(math.sqrt((8.0 - 10.0 / 2) / 10.0), rel=1e-15),
    )


def test_streaming_equals_batch():
    grads = _synthetic(60, 50, 1.0, 0.3, seed=2)
    acc = SNRAccumulator()
    assert acc.count == 0
    for i, row in enumerate(grads):
        acc.add(row.reshape(5, 10) if i % 2 else row)
    assert acc.count == 60
    streamed, batched = acc.result(), gradient_snr(grads)
    chunked = SNRAccumulator()
    chunked.add_batch(grads[:7].reshape(7, 5, 10))
    chunked.add_batch(grads[7:])
    for other in (batched, chunked.result()):
        assert other.count == streamed.count
        for field in ("mean_norm", "spread", "snr", "snr_debiased"):
            assert getattr(other, field) == pytest.approx(getattr(streamed, field), rel=1e-12)
    # result() leaves the accumulator usable.
    acc.add(grads[0])
    assert acc.count == 61


def test_identical_and_zero_gradients():
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    acc = SNRAccumulator()
    for _ in range(7):
        acc.add(g)
    stats = acc.result()
    assert stats.spread == 0.0
    assert stats.snr == math.inf
    assert stats.snr_debiased == math.inf
    assert stats.mean_norm == pytest.approx(float(g.double().norm()), rel=1e-12)
    zeros = gradient_snr(torch.zeros(4, 10))
    assert (zeros.spread, zeros.snr, zeros.snr_debiased) == (0.0, 0.0, 0.0)


def test_high_snr_spread_survives_cancellation():
    # ||g_i||^2 ~ 5e13 against a spread of ~7e-3: the unshifted sum ||g_i||^2 - n ||g_bar||^2
    # would lose every digit; the shifted accumulation matches a two-pass reference.
    grads = _synthetic(100, 50, 1e7, 1e-3, seed=4)
    reference = math.sqrt(float((grads - grads.mean(0)).square().sum()) / 99)
    assert gradient_snr(grads).spread == pytest.approx(reference, rel=1e-6)


def test_errors():
    acc = SNRAccumulator()
    with pytest.raises(ValueError, match="at least 2"):
        acc.result()
    acc.add(torch.ones(6))
    with pytest.raises(ValueError, match="at least 2"):
        acc.result()
    with pytest.raises(ValueError, match="6 elements"):
        acc.add(torch.ones(7))
    with pytest.raises(ValueError, match="at least 2"):
        gradient_snr(torch.ones(1, 5))
