"""``lrkd env``: what a bug report needs to know about this machine and its packages.

Versions of lrkd and the libraries it runs on, each checked against the range lrkd declares
(``pyproject.toml``), Python and the platform, the CPU's matrix extensions (bf16 speed differs by
an order of magnitude between AVX2-only and AMX machines) and the CUDA devices.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import dataclass

from packaging.requirements import Requirement

#: The packages reported, in order: lrkd's own dependencies first, then optional ones.
PACKAGES = (
    "torch",
    "transformers",
    "lightning",
    "jsonargparse",
    "tokenizers",
    "safetensors",
    "accelerate",
    "torchmetrics",
    "tensorboard",
    "gguf",
    "datasets",
    "lm_eval",
    "trl",
)

#: CPU flags that decide bf16/fp32 matmul speed (from /proc/cpuinfo on Linux).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class PackageInfo:
    """One package: its installed version (``None`` if absent) and lrkd's declared range
    (empty if lrkd declares none)."""

    name: str
    version: str | None
    supported: str

    @property
    def in_range(self) -> bool | None:
        """Whether the installed version is in lrkd's range (``None``: no range or absent)."""
        if self.version is None or not self.supported:
            return None
        return Requirement(f"{self.name}{self.supported}").specifier.contains(
            self.version.split("+")[0], prereleases=True
        )


def declared_ranges() -> dict[str, str]:
    """lrkd's declared version range of each of its required dependencies, by package name."""
    try:
        requirements = importlib.metadata.requires("lrkd") or []
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return {}
    ranges = {}
    for line in requirements:
        req = Requirement(line)
        if req.marker is None:  # extras (test, dev, bench) are not requirements of lrkd
            ranges[req.name.lower()] = str(req.specifier)
    return ranges


def packages() -> list[PackageInfo]:
    """The reported packages with their installed versions and lrkd's ranges."""
    ranges = declared_ranges()
    out = []
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = None
        out.append(PackageInfo(name, version, ranges.get(name, "")))
    return out


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its flags (from /proc/cpuinfo; no flags where it is absent)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` (the matmul extensions) this CPU has."""
    return [flag for flag in CPU_FLAGS if flag in cpu_model_and_flags()[1]]


def cpu_description() -> str:
    """The CPU model, its core count and which matmul extensions it has."""
    model, _ = cpu_model_and_flags()
    have = cpu_flags()
    return f"{model}, {os.cpu_count()} cores, {' '.join(have) or 'no AVX2/AVX-512/AMX flags'}"


def accelerator_description() -> list[str]:
    """One line per CUDA device (name, memory, compute capability, bf16), or why there is none."""
    import torch

    if not torch.cuda.is_available():
        return [f"CUDA: not available (torch built with CUDA {torch.version.cuda or 'none'})"]
    lines = [f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(
            f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, "
            f"sm_{p.major}{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        )
    return lines


def report() -> str:
    """The whole report, as printed by ``lrkd env``."""
    from lrkd import __version__
    from lrkd.hardware import cpu_bf16_probe

    lines = [
        f"lrkd {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"platform {platform.platform()}",
        f"cpu {cpu_description()}",
        f"cpu bf16 {cpu_bf16_probe().describe().removeprefix('lrkd: CPU bf16 matmul is ')}",
        *accelerator_description(),
        "packages (installed, lrkd's supported range):",
    ]
    for p in packages():
        state = {True: "", False: "  <- OUTSIDE the supported range", None: ""}[p.in_range]
        lines.append(
            f"  {p.name:<13} {p.version or 'not installed':<14} {p.supported or '-'}{state}"
        )
    return "\n".join(lines)
