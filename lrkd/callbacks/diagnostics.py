"""TensorBoard diagnostics: what the paced DataModule estimated, as plots and scalars."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["log_pacing"]


def log_pacing(
    loggers: Sequence[Any],
    *,
    pass_rate: Tensor,
    weight: Tensor,
    bucket_index: Tensor,
    bucket_labels: Sequence[str],
    num_samples: int,
    cold_start: bool,
    round_index: int,
    step: int,
) -> dict[str, float]:
    """Log one pass-rate estimate to every logger.

    ``weight`` is each problem's relative weight (mean 1 over the problems drawn).
    TensorBoard gets histograms of the pass rates (one bin per possible value k/K), of the
    weights and of the bucket indices, and a text table of the buckets; every logger
    gets the scalars ``pacing/mean_pass_rate``, ``pacing/frontier_share`` (the share of
    problems with 0 < p < 1), ``pacing/solved_share`` (p = 1), ``pacing/unsolved_share``
    (p = 0), ``pacing/cold_start``, ``pacing/round`` and ``pacing/bucket_count/<bucket>``.

    Returns:
        The scalars that were logged.
    """
    p = pass_rate.double().cpu()
    w = weight.double().cpu()
    counts = [int((bucket_index == b).sum()) for b in range(len(bucket_labels))]
    scalars = {
        "pacing/mean_pass_rate": float(p.mean()),
        "pacing/frontier_share": float(((p > 0) & (p < 1)).double().mean()),
        "pacing/solved_share": float((p >= 1).double().mean()),
        "pacing/unsolved_share": float((p <= 0).double().mean()),
        "pacing/cold_start": float(cold_start),
        "pacing/round": float(round_index),
    }
    for label, count in zip(bucket_labels, counts, strict=True):
        scalars[f"pacing/bucket_count/{label}"] = float(count)
    for logger in loggers:
        logger.log_metrics(scalars, step=step)
        writer = getattr(logger, "experiment", None)
        if not hasattr(writer, "add_histogram"):
            continue
        # One bin per attainable pass rate k/K, centred on it.
        edges = (np.arange(num_samples + 2) - 0.5) / num_samples
        writer.add_histogram("pacing/pass_rate", p.numpy(), step, bins=edges)
        writer.add_histogram("pacing/weight", w.numpy(), step)
        writer.add_histogram(
            "pacing/bucket", bucket_index.cpu().numpy(), step,
            bins=np.arange(len(bucket_labels) + 1) - 0.5,
        )  # fmt: skip
        rows = "\n".join(
            f"| {label} | {c} | {float(w[bucket_index == b].mean()) if c else 0.0:.4f} |"
            for b, (label, c) in enumerate(zip(bucket_labels, counts, strict=True))
        )
        table = f"| bucket | problems | mean weight |\n|---|---|---|\n{rows}"
        writer.add_text("pacing/buckets", table, step)
    return scalars
