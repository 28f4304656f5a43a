"""Pass rates, the Beta-kernel weight and pass-rate buckets (PACED, arXiv 2603.11178).

The student's **pass rate** on a problem is ``p = correct / K``: the share of its K sampled
answers that the verifier accepts. PACED weights each problem by

    w(p) = p**alpha * (1 - p)**beta        (alpha = beta = 1: w = p (1 - p), peak at p = 1/2)

so problems the student always (p = 1) or never (p = 0) solves get no weight and training goes
to the frontier of its competence.

Weighting modes (:data:`WEIGHTINGS`): ``paced`` is the kernel above, ``uniform`` gives every
problem weight 1 (plain distillation), ``hard_filter`` gives 1 to problems with 0 < p < 1 and 0
to the rest (the paper's baseline; DAPO-style dynamic filtering).

How a weight is applied (:data:`APPLY_MODES`) and normalised:

- ``loss_weight``: an example's divergence is multiplied by ``w_i / mean(w)``, the mean taken
  over the problems the sampler draws from (the problems with w > 0 when zero-weight problems
  are skipped, else all). The average weight of a drawn example is then 1, so the loss keeps
  the scale of unweighted distillation (a learning rate carries over), and a problem's share
  of the gradient is proportional to its w.
- ``sampling``: problems are drawn with probability ``w_i / sum(w)`` (with replacement) and
  every drawn example has weight 1. The expected gradient points the same way as under
  ``loss_weight``; the variance differs.

**Cold start.** A student that solves nothing yet (every p = 0), or everything, has w = 0 on
every problem and PACED has nothing to train on. The rule lrkd applies when fewer than
``min_frontier`` problems have w > 0 (default 1: exactly that all-zero case) is chosen by
``cold_start``:

- ``uniform`` (default): weight every problem 1, i.e. plain distillation, until an estimate
  finds a frontier. Plain forward KL is what builds the first competence; the weights switch
  to PACED at the first re-estimation that finds problems with 0 < p < 1.
- ``laplace``: weight by w of the smoothed rate ``(correct + 1) / (K + 2)`` (the posterior
  mean under a uniform prior), which is never 0 or 1; with every p = 0 this is again uniform,
  but a mixed estimate keeps a nonzero weight on every problem.
- ``error``: stop with an error (for experiments that must not silently fall back).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "APPLY_MODES",
    "COLD_STARTS",
    "WEIGHTINGS",
    "PacingWeights",
    "beta_kernel_weight",
    "bucket_labels",
    "bucketize",
    "check_bucket_edges",
    "pacing_weights",
    "pass_rates",
]

WEIGHTINGS = ("paced", "uniform", "hard_filter")
APPLY_MODES = ("loss_weight", "sampling")
COLD_STARTS = ("uniform", "laplace", "error")


def beta_kernel_weight(pass_rate: Tensor, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """The PACED weight ``w(p) = p**alpha * (1 - p)**beta`` (``0**0`` is 1).

    Args:
        pass_rate: pass rates in [0, 1].
        alpha: exponent of p; larger values favour problems the student mostly solves.
        beta: exponent of 1 - p; larger values favour problems the student mostly fails.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    p = pass_rate.to(torch.float64)
    if bool(((p < 0) | (p > 1) | p.isnan()).any()):
        raise ValueError("pass rates must lie in [0, 1]")
    return p.pow(alpha) * (1.0 - p).pow(beta)


def pass_rates(correct: Tensor, num_samples: int) -> Tensor:
    """``p = correct / K`` per problem, as float64."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    return correct.to(torch.float64) / num_samples


@dataclass
class PacingWeights:
    """Per-problem weights computed from one pass-rate estimate.

    Attributes:
        weight: the raw weight w of each problem (before normalisation), float64.
        cold_start: whether the cold-start rule replaced the weighting (too few problems had
            w > 0).
    """

    weight: Tensor
    cold_start: bool


def pacing_weights(
    correct: Tensor,
    num_samples: int,
    weighting: str = "paced",
    alpha: float = 1.0,
    beta: float = 1.0,
    cold_start: str = "uniform",
    min_frontier: int = 1,
) -> PacingWeights:
    """Turn correct-answer counts into per-problem weights, applying the cold-start rule.

    Args:
        correct: the number of accepted samples per problem [N].
        num_samples: samples per problem (K).
        weighting: ``paced``, ``uniform`` or ``hard_filter`` (see the module docs).
        alpha: the kernel's exponent of p (``paced``).
        beta: the kernel's exponent of 1 - p (``paced``).
        cold_start: ``uniform``, ``laplace`` or ``error``: what to do when fewer than
            ``min_frontier`` problems have w > 0.
        min_frontier: the fewest problems with w > 0 that count as a usable estimate.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if cold_start not in COLD_STARTS:
        raise ValueError(f"cold_start={cold_start!r}; choose one of {', '.join(COLD_STARTS)}")
    if bool(((correct < 0) | (correct > num_samples)).any()):
        raise ValueError(f"correct counts must lie in [0, num_samples={num_samples}]")
    p = pass_rates(correct, num_samples)
    if weighting == "uniform":
        return PacingWeights(torch.ones_like(p), cold_start=False)
    weight = _weight(p, weighting, alpha, beta)
    if int((weight > 0).sum()) >= max(min_frontier, 1):
        return PacingWeights(weight, cold_start=False)
    if cold_start == "error":
        raise RuntimeError(
            f"cold start: only {int((weight > 0).sum())} of {len(p)} problems have a nonzero "
            f"{weighting} weight (the student solves none, or all, of its samples); set "
            "data.pacing.cold_start to uniform or laplace, or start from a more capable student."
        )
    if cold_start == "uniform":
        return PacingWeights(torch.ones_like(p), cold_start=True)
    smoothed = (correct.to(torch.float64) + 1.0) / (num_samples + 2.0)
    return PacingWeights(_weight(smoothed, weighting, alpha, beta), cold_start=True)


def _weight(p: Tensor, weighting: str, alpha: float, beta: float) -> Tensor:
    if weighting == "paced":
        return beta_kernel_weight(p, alpha, beta)
    return ((p > 0) & (p < 1)).to(torch.float64)  # hard_filter


def check_bucket_edges(edges: Sequence[float], name: str = "bucket edges") -> list[float]:
    """Validate interior bucket edges: strictly increasing, inside (0, 1). ``name`` names them
    in the error (e.g. the config field ``data.pacing.bucket_edges``)."""
    edges = [float(e) for e in edges]
    if any(not 0.0 < e < 1.0 for e in edges):
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {edges}")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"{name} must be strictly increasing, got {edges}")
    return edges


def bucketize(pass_rate: Tensor, edges: Sequence[float]) -> Tensor:
    """The bucket index of each pass rate.

    Buckets are ``p = 0``, then ``(0, e_1]``, ``(e_1, e_2]``, ..., ``(e_m, 1)``, then ``p = 1``
    for interior edges ``e_1 < ... < e_m``: ``m + 3`` buckets, so the problems PACED ignores
    (never or always solved) always have buckets of their own.
    """
    edges = check_bucket_edges(edges)
    p = pass_rate.to(torch.float64)
    boundaries = torch.tensor(edges, dtype=torch.float64)
    interior = torch.bucketize(p, boundaries, right=False) + 1  # (e_j, e_{j+1}] -> j + 2
    index = torch.where(p <= 0, torch.zeros_like(interior), interior)
    return torch.where(p >= 1, torch.full_like(interior, len(edges) + 2), index)


def bucket_labels(edges: Sequence[float]) -> list[str]:
    """Readable names of the buckets of :func:`bucketize`, e.g. ``p=0``, ``(0,0.25]``, ``p=1``."""
    edges = check_bucket_edges(edges)
    bounds = [0.0, *edges, 1.0]
    labels = ["p=0"]
    for j, (low, high) in enumerate(itertools.pairwise(bounds)):
        closing = ")" if j == len(bounds) - 2 else "]"
        labels.append(f"({low:g},{high:g}{closing}")
    labels.append("p=1")
    return labels
