"""Which float format is fast here: bf16 on a GPU that supports it, and on a CPU a measured
choice.

CPUs differ by two orders of magnitude in bf16 matmul speed: Intel Xeons with AMX run a bf16
matmul about 7x faster than fp32, AVX2-only machines (many AMD EPYCs) 10-100x slower. So on
the CPU lrkd does not guess: the first time a default is needed, :func:`cpu_bf16_probe` times a
small fp32 and a small bf16 matmul, alternating (a few milliseconds where bf16 is fast, about
0.25 s where it is slow), and ``auto`` means bf16 where bf16 was at least
:data:`BF16_SPEEDUP` times as fast as fp32. The decision and the measured ratio are logged once
per process; the ratio is exported in :data:`PROBE_ENV`, so that processes started from this one
(DDP's workers) make the same choice without measuring again.

Setting :data:`PROBE_ENV` yourself skips the measurement: ``LRKD_CPU_BF16_SPEEDUP=0`` keeps fp32,
``LRKD_CPU_BF16_SPEEDUP=8`` picks bf16. An explicit ``trainer.precision`` or
``model.teacher_dtype`` always wins over ``auto``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

log = logging.getLogger("lrkd")

#: bf16 must be at least this many times as fast as fp32 for ``auto`` to pick it on a CPU.
#: A whole distillation step gains less than its matmuls (on an AMX Xeon a 7x faster matmul
#: made the step 1.7x faster), so a small matmul gain is not worth bf16's rounding.
BF16_SPEEDUP = 2.0

#: Environment variable holding the measured (or a forced) bf16/fp32 matmul speed ratio.
PROBE_ENV = "LRKD_CPU_BF16_SPEEDUP"

_SIZE = 256  # large enough to reach the matrix units, small enough for slow bf16 (~30 ms)
_BUDGET_S = 0.15  # per dtype, after one warm-up; at least two timed repetitions of each
_MAX_REPS = 8


@dataclass(frozen=True)
class CpuProbe:
    """The CPU's bf16/fp32 matmul speeds.

    Attributes:
        speedup: fp32 time / bf16 time of the same matmul (above 1: bf16 is faster).
        fp32_gflops: the fp32 matmul's speed, GFLOP/s (``nan`` when forced).
        bf16_gflops: the bf16 matmul's speed, GFLOP/s (``nan`` when forced).
        source: ``measured``, or where a forced value came from.
    """

    speedup: float
    fp32_gflops: float = math.nan
    bf16_gflops: float = math.nan
    source: str = "measured"

    @property
    def prefers_bf16(self) -> bool:
        """Whether ``auto`` picks bf16 on this CPU."""
        return self.speedup >= BF16_SPEEDUP

    def describe(self) -> str:
        """One line: the ratio, how it was obtained, and the choice it implies."""
        if self.source == "measured":
            how = (
                f"a {_SIZE}^3 matmul ran at {self.bf16_gflops:.1f} GFLOP/s in bf16 and "
                f"{self.fp32_gflops:.1f} in fp32 on {torch.get_num_threads()} threads"
            )
        else:
            how = f"from {self.source}"
        choice = (
            "bf16-mixed precision and a bf16 teacher"
            if self.prefers_bf16
            else "fp32 (32-true precision, fp32 teacher)"
        )
        return (
            f"lrkd: CPU bf16 matmul is {self.speedup:.2f}x fp32 ({how}); auto picks {choice} "
            f"(bf16 needs >= {BF16_SPEEDUP:g}x; set trainer.precision / model.teacher_dtype to "
            "choose)"
        )


def _operands(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(_SIZE, _SIZE, generator=generator).to(dtype)
    b = torch.randn(_SIZE, _SIZE, generator=generator).to(dtype)
    return a, b


def measure_cpu_bf16() -> CpuProbe:
    """Time a small fp32 and bf16 matmul on the CPU, now (no caching, no logging).

    The two alternate, and each keeps its fastest repetition, so that another process taking
    the cores for a moment slows both or neither rather than one of them.
    """
    pairs = {dtype: _operands(dtype) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, math.inf)
    spent, reps = 0.0, 0
    for a, b in pairs.values():  # warm-up: first-call costs (thread pool, kernel selection)
        torch.mm(a, b)
    while reps < 2 or (spent < 2 * _BUDGET_S and reps < _MAX_REPS):
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            torch.mm(a, b)
            elapsed = time.perf_counter() - start
            best[dtype], spent = min(best[dtype], elapsed), spent + elapsed
        reps += 1
    fp32, bf16 = (max(best[d], 1e-9) for d in (torch.float32, torch.bfloat16))
    flop = 2 * _SIZE**3
    return CpuProbe(fp32 / bf16, flop / fp32 / 1e9, flop / bf16 / 1e9)


@functools.cache
def cpu_bf16_probe() -> CpuProbe:
    """The CPU's bf16/fp32 matmul speed ratio, measured once per process (or taken from
    :data:`PROBE_ENV`), logged once and exported to child processes.

    Raises:
        ValueError: :data:`PROBE_ENV` is set but not a non-negative number.
    """
    forced = os.environ.get(PROBE_ENV)
    if forced is not None:
        try:
            speedup = float(forced)
        except ValueError:
            speedup = -1.0
        if not speedup >= 0:  # also rejects nan
            raise ValueError(
                f"{PROBE_ENV}={forced!r}: expected the bf16/fp32 matmul speed ratio, a number "
                "such as 0 (keep fp32) or 8 (use bf16); unset it to measure."
            )
        probe = CpuProbe(speedup, source=f"${PROBE_ENV}")
    else:
        probe = measure_cpu_bf16()
        os.environ[PROBE_ENV] = f"{probe.speedup:.4g}"
    log.info(probe.describe())
    return probe


def cuda_bf16() -> bool:
    """Whether a CUDA GPU that supports bf16 is visible."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def prefers_bf16() -> bool:
    """Whether ``auto`` means bf16 here: a CUDA GPU with bf16, or a CPU where the probe found
    bf16 matmuls clearly faster (:data:`BF16_SPEEDUP`)."""
    return cuda_bf16() or cpu_bf16_probe().prefers_bf16


def auto_precision() -> str:
    """The Trainer precision ``auto`` stands for: ``bf16-mixed`` or ``32-true``."""
    return "bf16-mixed" if prefers_bf16() else "32-true"


def auto_teacher_dtype() -> torch.dtype:
    """The teacher weights' dtype ``auto`` stands for: bfloat16 or float32."""
    return torch.bfloat16 if prefers_bf16() else torch.float32
