"""One-command GPU suite: the GPU tests, throughput, loss memory and an FSDP2 bf16 smoke run.

Usage::

    bash benchmarks/gpu_suite.sh                 # one CUDA GPU; writes gpu_suite_out/ (or $OUT)
    bash benchmarks/gpu_suite.sh --out DIR --only throughput-lrc throughput-plain
    bash benchmarks/gpu_suite.sh --cpu-check     # the tiny CPU rehearsal of every part

It runs six parts in order, each but ``env`` in its own process with its own time limit, its
output in ``<out>/<part>.log``, and a progress line when it ends (``[3/6] throughput-lrc ...
ok (41 s)``). A part that fails or runs out of time does not stop the ones after it: one run
gives the whole picture. At the end it writes ``<out>/summary.md`` (printed too) and
``<out>/summary.json``, and exits 0 when every part is ok, else 1.

1. ``env``: versions of torch, transformers, lightning and lrkd (which checkout), Python, the
   GPU (name, memory, compute capability, bf16), CUDA and the driver; the CPU in CPU mode.
2. ``gpu-tests``: ``pytest -m gpu tests`` (the CUDA paths: bf16 losses, the module's step,
   ``lrkd fit`` under FSDP2 and FSDP1); passed/failed/skipped counts from its JUnit XML.
3. ``throughput-lrc``: ``benchmarks/throughput.py --steps-kind lrc`` at its default shape (a
   Llama-3.2-3B-shaped teacher and a hidden-1536 low-rank clone, seq 2048, micro-batch 3,
   bf16-mixed): tokens/s, ms per optimizer step, peak memory, MFU.
4. ``throughput-plain``: the same for a plain 1.5B-shaped student (forward KL, micro-batch 4).
   The summary puts both next to the issue's anchors, measured on one H100 80GB in bf16 at seq
   2048: the official LRC step 13,288 tokens/s, TRL GKDTrainer 16,864, the student alone 29,320.
5. ``loss-memory``: ``benchmarks/loss_memory.py`` at batch 4 x 2048 tokens, vocabulary 128,256,
   from hidden states 1536 (student) and 3072 (teacher) in bf16: the peak extra CUDA memory of
   the naive, chunked and fused KD losses (forward + backward) and their PASS/FAIL ratios.
6. ``fsdp2-smoke``: ``lrkd fit`` with ``configs/strategies/fsdp2_bf16.yaml`` on one GPU (FSDP2,
   bf16-mixed) for 4 steps: a tiny random Llama teacher and tokenizer made on the spot (no
   network), a low-rank clone student, the built-in corpus. Checks: exit 0, finite losses, a
   sharded checkpoint, the exported student loads and ``lrkd export`` of the checkpoint writes
   the same weights.

The default time limits add up to 465 s (under 8 minutes); ``--timeout-scale`` multiplies them
and ``--part-timeout PART=SECONDS`` sets one. ``--throughput-args "--micro-batch 2"`` passes
arguments on to both throughput runs (a GPU smaller than 80 GB may need it).

It stops at once, with one line on stderr and exit status 2, when no CUDA device is visible
(unless ``--cpu-check``), when a package it needs cannot be imported, or when a file of the
checkout is missing. The children run offline (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``,
``HF_DATASETS_OFFLINE=1``), with this checkout first on ``PYTHONPATH`` and ``LRKD_CACHE_DIR`` in
a temporary folder (removed at the end).

``--cpu-check`` runs every part on the CPU at tiny shapes (``throughput.py --tiny``, a 512-token
vocabulary for the loss, FSDP2 over gloo) with CUDA hidden from the children: the GPU tests are
collected and reported as skipped. Its numbers only show that the parts run; the loss-memory
ratios are not meaningful at those sizes, so a FAIL verdict there does not fail the part.

Test hook (for ``tests/unit/test_gpu_suite.py``, hidden from ``--help``): ``--inject-failure
PART`` replaces that part's command by one that exits 1; ``--inject-failure PART:hang`` by one
that starts a child process and sleeps past any limit (the time limit ends the whole process
group). The option may be repeated.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "gpu-tests", "throughput-lrc", "throughput-plain", "loss-memory", "fsdp2-smoke")
GPU_TIMEOUTS = {
    "env": 15.0,
    "gpu-tests": 150.0,
    "throughput-lrc": 90.0,
    "throughput-plain": 90.0,
    "loss-memory": 60.0,
    "fsdp2-smoke": 60.0,
}
"""Seconds per part on one GPU: 465 s in all, under the issue's 8 minutes."""
CPU_TIMEOUTS = {
    "env": 30.0,
    "gpu-tests": 300.0,
    "throughput-lrc": 300.0,
    "throughput-plain": 300.0,
    "loss-memory": 300.0,
    "fsdp2-smoke": 300.0,
}
"""Seconds per part in ``--cpu-check`` (about 10-20 s each on a 2-core CPU)."""
REQUIRED_MODULES = (
    "torch",
    "lightning",
    "transformers",
    "tokenizers",
    "jsonargparse",
    "datasets",
    "yaml",
    "pytest",
    "lrkd",
)
REQUIRED_FILES = (
    "benchmarks/throughput.py",
    "benchmarks/loss_memory.py",
    "benchmarks/shapes.py",
    "configs/strategies/fsdp2_bf16.yaml",
    "tests/conftest.py",
)
RESULT_MARKER = "GPU_SUITE_RESULT "
ANCHORS = {
    "lrc": (13_288.0, "official LRC step"),
    "plain": (16_864.0, "TRL GKDTrainer, forward KL"),
}
"""The issue's tokens/s at the default shape on one H100 80GB in bf16 (throughput.py's)."""
ANCHOR_STUDENT_CE = 29_320.0
LOG_TAIL_LINES = 15
EXPORT_TOLERANCE = 2**-6
"""Largest relative difference between the two exports of the smoke run (bf16 rounding is
2**-8 of a value, 2**-9 on average)."""
GIB = 2**30
MIB = 2**20
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

Numbers = dict[str, Any]
Verdict = tuple[Numbers, str | None, str | None]
"""A finished part's numbers, why it is not ok (``None``: ok) and a note."""


@dataclass
class PartResult:
    """What one part did.

    Attributes:
        name: The part's name (one of :data:`PARTS`).
        status: ``ok``, ``failed``, ``timeout``, ``interrupted`` or ``not run``.
        seconds: Wall time.
        timeout_s: Its time limit.
        returncode: The process's exit status (``None``: in-process, or ended by the limit).
        command: The command line (empty for ``env``).
        log: Path of its log file.
        reason: Why it is not ok, in one line (``None`` when ok).
        note: A remark on an ok part (e.g. numbers not meaningful in CPU mode).
        numbers: Its key numbers.
        log_tail: The last lines of its log (failed parts).
    """

    name: str
    status: str = "not run"
    seconds: float = 0.0
    timeout_s: float = 0.0
    returncode: int | None = None
    command: str = ""
    log: str = ""
    reason: str | None = None
    note: str | None = None
    numbers: Numbers = field(default_factory=dict)
    log_tail: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- checks
def fail_fast(message: str) -> int:
    """Print ``gpu_suite: message`` as one line on stderr and return exit status 2."""
    print(f"gpu_suite: {message}", file=sys.stderr, flush=True)
    return 2


def missing_modules(names: Sequence[str]) -> list[str]:
    """The top-level modules in ``names`` that cannot be found (nothing is imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def cuda_problem() -> str | None:
    """Why this process sees no CUDA device, in one line; ``None`` when it sees one."""
    import torch

    with warnings.catch_warnings():  # e.g. "CUDA initialization: the driver is too old"
        warnings.simplefilter("ignore")
        available = torch.cuda.is_available()
    if available:
        return None
    build = torch.version.cuda or "none"
    return (
        f"no CUDA device visible (torch {torch.__version__}, CUDA build: {build}); run on a "
        "machine with a GPU, or --cpu-check for the tiny CPU rehearsal"
    )


def gpu_warnings() -> list[str]:
    """What about the visible GPU will likely make parts fail (not a reason to stop: the other
    parts still tell something)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    warnings_ = []
    if not torch.cuda.is_bf16_supported():
        warnings_.append(
            f"{props.name} does not support bf16: throughput, loss-memory and fsdp2-smoke run "
            "in bf16 and will likely fail"
        )
    if props.total_memory < 75 * GIB:
        warnings_.append(
            f"{props.name} has {props.total_memory / GIB:.0f} GiB: the default throughput shape "
            "was sized for an 80 GB H100 (the anchors' runs took 59 and 74 GiB); if it runs out "
            'of memory, try --throughput-args="--micro-batch 1 --activation-checkpointing"'
        )
    return warnings_


# ---------------------------------------------------------------------------------- env
def version_of(distribution: str) -> str | None:
    """The installed version of ``distribution`` (``None`` when absent)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str | None:
    """The checkout's commit (``-dirty`` when it has changes), or ``None`` without git."""
    if shutil.which("git") is None:
        return None
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=5, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def driver_version() -> str | None:
    """The NVIDIA driver's version from ``nvidia-smi`` (``None`` when it is not there)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else None


def environment(cpu_check: bool) -> Numbers:
    """The versions and hardware the summary reports (cheap: no model is built).

    Args:
        cpu_check: CPU mode; the GPU is not described even when there is one.

    Returns:
        A flat dict of versions and hardware facts.
    """
    import torch

    import lrkd

    info: Numbers = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "transformers": version_of("transformers"),
        "lightning": version_of("lightning"),
        "lrkd": getattr(lrkd, "__version__", None),
        "lrkd_path": str(Path(lrkd.__file__).resolve().parent),
        "checkout": str(ROOT),
        "git": git_revision(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if cpu_check or not torch.cuda.is_available():
        info["device"] = "cpu"
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(
        device="cuda",
        gpu=props.name,
        gpu_count=torch.cuda.device_count(),
        gpu_memory_gib=round(props.total_memory / GIB, 1),
        capability=f"sm_{props.major}{props.minor}",
        bf16=bool(torch.cuda.is_bf16_supported()),
        cudnn=torch.backends.cudnn.version(),
        driver=driver_version(),
    )
    return info


def env_line(info: Numbers) -> str:
    """The environment in one line."""
    versions = (
        f"torch {info['torch']} (CUDA build {info['torch_cuda_build'] or 'none'}), "
        f"transformers {info['transformers']}, lightning {info['lightning']}, lrkd {info['lrkd']}"
    )
    if info.get("device") == "cuda":
        device = (
            f"{info['gpu']} ({info['gpu_memory_gib']} GiB, {info['capability']}, bf16 "
            f"{'yes' if info['bf16'] else 'no'}, driver {info['driver'] or '?'})"
        )
    else:
        device = f"CPU {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} threads)"
    return f"{device}; {versions}"


# ---------------------------------------------------------------------------------- parsing
def clean_lines(text: str) -> list[str]:
    """The log's lines as a terminal would show them: progress-bar redraws (``\\r``) collapsed
    to their last state, blank lines dropped."""
    lines = []
    for raw in text.splitlines():
        line = raw.rsplit("\r", 1)[-1].rstrip()
        if line.strip():
            lines.append(line)
    return lines


def last_line(text: str) -> str:
    """The log's last line with text (the usual place of an error), at most 300 characters."""
    lines = clean_lines(text)
    return lines[-1].strip()[:300] if lines else "(no output)"


def result_payload(text: str) -> Numbers | None:
    """The JSON after the last :data:`RESULT_MARKER` line of ``text``, if any."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line.removeprefix(RESULT_MARKER))
    return None


def parse_junit(path: Path) -> Numbers:
    """Test counts and failed tests from a pytest JUnit XML file.

    Args:
        path: The ``--junitxml`` file.

    Returns:
        ``tests``, ``passed``, ``failed``, ``errors``, ``skipped`` and ``failures`` (up to 10
        ``test id: first line of the message``).
    """
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for suite in suites:
        counts["tests"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
        for case in suite.iter("testcase"):
            for bad in [*case.findall("failure"), *case.findall("error")]:
                message = (bad.get("message") or "").strip().splitlines()
                failures.append(
                    f"{case.get('classname')}::{case.get('name')}: {message[0] if message else ''}"
                )
    passed = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {**counts, "passed": passed, "failures": failures[:10]}


LOSS_ROW = re.compile(r"^(naive|chunked|fused)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.eE+-]+|nan)$")
LOSS_RATIO = re.compile(
    r"^(chunked|fused)/naive peak ratio: (-?[\d.]+) \((PASS|FAIL): threshold ([\d.]+)\)"
)


def parse_loss_memory(text: str) -> Numbers:
    """The numbers of ``benchmarks/loss_memory.py``'s printed table.

    Args:
        text: Its output.

    Returns:
        ``{implementation: {peak_mib, ms, loss}}`` for each table row, ``{kind}_ratio``,
        ``{kind}_verdict`` and ``{kind}_threshold`` for each ratio line, ``setting`` (its first
        line) and ``table`` (its lines from the setting on, verbatim).
    """
    numbers: Numbers = {}
    lines = clean_lines(text)
    start = next((i for i, line in enumerate(lines) if line.startswith("kind=")), None)
    if start is not None:
        numbers["setting"] = lines[start]
        numbers["table"] = [
            line for line in lines[start:] if not line.startswith(("$ ", RESULT_MARKER))
        ]
    for line in lines:
        row = LOSS_ROW.match(line.strip())
        if row:
            name, peak, ms, loss = row.groups()
            numbers[name] = {"peak_mib": float(peak), "ms": float(ms), "loss": float(loss)}
        ratio = LOSS_RATIO.match(line.strip())
        if ratio:
            kind, value, verdict, threshold = ratio.groups()
            numbers[f"{kind}_ratio"] = float(value)
            numbers[f"{kind}_verdict"] = verdict
            numbers[f"{kind}_threshold"] = float(threshold)
    return numbers


def throughput_numbers(payload: Numbers, kind: str) -> Numbers:
    """The summary's numbers for ``kind`` from ``throughput.py --json``'s payload.

    Raises:
        ValueError: The payload has no row of ``kind``, or its row is an error.
    """
    rows = [row for row in payload.get("rows", []) if row.get("kind") == kind]
    if not rows:
        raise ValueError(f"no {kind} row in the JSON")
    row = rows[0]
    if "error" in row:
        raise ValueError(row["error"])
    anchor = payload.get("anchors", {}).get(kind, ANCHORS[kind][0])
    keys = ("device_name", "micro_batch", "gradient_accumulation", "seq", "steps",
            "tokens_per_s", "ms_per_step", "peak_memory_bytes", "peak_memory_kind", "mfu",
            "mfu_model_only", "achieved_tflops", "ceiling_tflops", "ceiling_dtype",
            "flops_per_token", "anchor_comparable", "losses")  # fmt: skip
    numbers = {key: row.get(key) for key in keys}
    settings = payload.get("settings", {})
    numbers.update(
        shape=payload.get("shape"),
        precision=settings.get("precision"),
        dtype=settings.get("dtype"),
        anchor_tokens_per_s=anchor,
        anchor_ratio=row["tokens_per_s"] / anchor,
    )
    return numbers


def fmt_memory(numbers: Numbers) -> str:
    """A throughput row's peak memory: GiB on CUDA, MiB of RSS growth on the CPU."""
    n = numbers.get("peak_memory_bytes")
    if n is None:
        return "?"
    if str(numbers.get("peak_memory_kind", "")).startswith("CUDA"):
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB RSS"


# ---------------------------------------------------------------------------------- parts
class Suite:
    """The parts of one run: their commands, how each is judged, and the summary.

    Args:
        out: Where logs and the summary go.
        work: A scratch folder (teacher, cache, checkpoints).
        cpu_check: Tiny shapes on the CPU, CUDA hidden from the children.
        timeouts: Seconds per part.
        inject: Test hook: ``{part: "fail" | "hang"}``.
        throughput_args: Extra arguments for both throughput runs.
    """

    def __init__(
        self,
        out: Path,
        work: Path,
        cpu_check: bool,
        timeouts: dict[str, float],
        inject: dict[str, str] | None = None,
        throughput_args: Sequence[str] = (),
    ) -> None:
        self.out = out
        self.work = work
        self.cpu_check = cpu_check
        self.timeouts = timeouts
        self.inject = inject or {}
        self.throughput_args = list(throughput_args)
        self.env_info: Numbers = {}

    # ---- commands
    def child_env(self) -> dict[str, str]:
        """The children's environment: offline, this checkout first, a scratch lrkd cache."""
        env = dict(os.environ)
        env.update(OFFLINE_ENV)
        paths = [str(ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["LRKD_CACHE_DIR"] = str(self.work / "cache")
        if self.cpu_check:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def command(self, part: str) -> list[str]:
        """The command line of ``part`` (the injected one under the test hook)."""
        py = sys.executable
        injected = self.inject.get(part)
        if injected == "fail":
            code = "import sys; print('gpu_suite: injected failure (test hook)'); sys.exit(1)"
            return [py, "-c", code]
        if injected == "hang":
            code = (
                "import subprocess, sys, time\n"
                "sleeper = [sys.executable, '-c', 'import time; time.sleep(3600)']\n"
                "child = subprocess.Popen(sleeper)\n"
                "print('gpu_suite: injected hang (test hook), child pid', child.pid, flush=True)\n"
                "time.sleep(3600)\n"
            )
            return [py, "-c", code]
        if part == "gpu-tests":
            return [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                    "--junitxml", str(self.out / "gpu-tests.xml"), str(ROOT / "tests")]  # fmt: skip
        if part.startswith("throughput-"):
            kind = part.removeprefix("throughput-")
            cmd = [py, str(ROOT / "benchmarks" / "throughput.py"), "--steps-kind", kind,
                   "--json", str(self.out / f"{part}.json")]  # fmt: skip
            if self.cpu_check:
                cmd += ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0"]
            return cmd + self.throughput_args
        if part == "loss-memory":
            cmd = [py, str(ROOT / "benchmarks" / "loss_memory.py")]
            if self.cpu_check:
                sizes = ["--device", "cpu", "--dtype", "float32", "--batch", "1",
                         "--length", "64", "--vocab", "512", "--from-hidden", "32", "64",
                         "--threads", "1"]  # fmt: skip
            else:
                sizes = ["--device", "cuda", "--dtype", "bfloat16", "--batch", "4",
                         "--length", "2048", "--vocab", "128256", "--from-hidden", "1536",
                         "3072"]  # fmt: skip
            return cmd + sizes
        if part == "fsdp2-smoke":
            cmd = [py, str(Path(__file__).resolve()), "--fsdp2-worker", str(self.work / "fsdp2")]
            return cmd + (["--cpu-check"] if self.cpu_check else [])
        raise ValueError(f"no command for part {part!r}")

    # ---- judging
    def judge(self, part: str, text: str, returncode: int) -> Verdict:
        """A finished part's numbers, why it failed (``None``: ok) and a note.

        Args:
            part: The part.
            text: Its log.
            returncode: Its exit status.

        Returns:
            ``(numbers, reason, note)``.
        """
        if part in self.inject:
            return {}, f"exit {returncode}: {last_line(text)}", None
        if part.startswith("throughput-"):
            return self.judge_throughput(part, text, returncode)
        judges = {
            "gpu-tests": self.judge_gpu_tests,
            "loss-memory": self.judge_loss_memory,
            "fsdp2-smoke": self.judge_fsdp2,
        }
        return judges[part](text, returncode)

    def judge_gpu_tests(self, text: str, returncode: int) -> Verdict:
        """ok when pytest exits 0 and, on a GPU, not every test was skipped."""
        xml = self.out / "gpu-tests.xml"
        numbers = parse_junit(xml) if xml.is_file() else {}
        if returncode == 5:
            return numbers, "pytest collected no test marked gpu (exit 5)", None
        if returncode != 0:
            failed = numbers.get("failed", 0) + numbers.get("errors", 0)
            if numbers and failed:
                return numbers, f"{failed} of {numbers['tests']} GPU tests failed", None
            return numbers, f"pytest exit {returncode}: {last_line(text)}", None
        if not numbers:
            return numbers, "pytest wrote no JUnit XML", None
        if self.cpu_check:
            return numbers, None, "CPU mode: CUDA hidden, so the GPU tests are only collected"
        if numbers["tests"] and numbers["skipped"] == numbers["tests"]:
            return numbers, f"all {numbers['tests']} GPU tests were skipped on a CUDA machine", None
        return numbers, None, None

    def judge_throughput(self, part: str, text: str, returncode: int) -> Verdict:
        """ok when throughput.py exits 0 and its JSON has the row of this step kind."""
        kind = part.removeprefix("throughput-")
        path = self.out / f"{part}.json"
        if not path.is_file():
            return {}, f"exit {returncode}, no JSON written: {last_line(text)}", None
        try:
            numbers = throughput_numbers(json.loads(path.read_text()), kind)
        except (ValueError, KeyError) as err:
            return {}, f"exit {returncode}: {err}"[:500], None
        if returncode != 0:
            return numbers, f"exit {returncode}", None
        note = "CPU mode, tiny shape: not a benchmark" if self.cpu_check else None
        return numbers, None, note

    def judge_loss_memory(self, text: str, returncode: int) -> Verdict:
        """ok when loss_memory.py printed its whole table and exited 0; in CPU mode its tiny
        sizes make the ratios meaningless, so a FAIL verdict (exit 1) is accepted there."""
        numbers = parse_loss_memory(text)
        complete = all(name in numbers for name in ("naive", "chunked", "fused")) and all(
            f"{kind}_verdict" in numbers for kind in ("chunked", "fused")
        )
        if not complete:
            return numbers, f"exit {returncode}, no complete table: {last_line(text)}", None
        fails = [k for k in ("chunked", "fused") if numbers[f"{k}_verdict"] == "FAIL"]
        verdicts = ", ".join(
            f"{k}/naive {numbers[f'{k}_ratio']:.3f} > {numbers[f'{k}_threshold']}" for k in fails
        )
        if self.cpu_check and returncode in (0, 1):
            note = "CPU mode, tiny sizes: the ratios are not meaningful"
            return numbers, None, note + (f" (FAIL verdicts: {verdicts})" if fails else "")
        if returncode != 0:
            return numbers, f"exit {returncode}" + (f": FAIL {verdicts}" if fails else ""), None
        return numbers, None, None

    def judge_fsdp2(self, text: str, returncode: int) -> Verdict:
        """ok when the worker exits 0 and reports its checks."""
        payload = result_payload(text) or {}
        if returncode != 0 or not payload.get("ok"):
            reason = payload.get("problem") or last_line(text)
            return payload, f"exit {returncode}: {reason}", None
        return payload, None, None

    # ---- running
    def run_part(self, part: str) -> PartResult:
        """Runs one part and judges it (``env`` in this process)."""
        result = PartResult(name=part, timeout_s=self.timeouts[part])
        log = self.out / f"{part}.log"
        result.log = str(log)
        start = time.perf_counter()
        if part == "env" and part not in self.inject:
            try:
                self.env_info = environment(self.cpu_check)
                log.write_text(json.dumps(self.env_info, indent=2) + "\n")
                result.numbers = dict(self.env_info)
                result.status = "ok"
            except Exception as err:  # report it, go on with the other parts
                log.write_text(f"{type(err).__name__}: {err}\n")
                result.status, result.reason = "failed", f"{type(err).__name__}: {err}"
            result.seconds = time.perf_counter() - start
            return result

        for stale in (self.out / f"{part}.json", self.out / f"{part}.xml"):
            stale.unlink(missing_ok=True)
        cmd = self.command(part)
        result.command = shlex.join(cmd)
        returncode, timed_out = run_logged(cmd, log, self.timeouts[part], self.child_env())
        result.seconds = time.perf_counter() - start
        result.returncode = returncode
        text = log.read_text(errors="replace")
        if timed_out:
            result.status = "timeout"
            result.reason = f"ran past its limit of {self.timeouts[part]:.0f} s (killed)"
        else:
            result.numbers, result.reason, result.note = self.judge(part, text, returncode)
            result.status = "ok" if result.reason is None else "failed"
        if result.status != "ok":
            result.log_tail = clean_lines(text)[-LOG_TAIL_LINES:]
        return result


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """End ``proc``'s whole process group: SIGTERM, up to 5 s to exit, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int, bool]:
    """Runs ``cmd`` in its own process group from the checkout, its output into ``log``.

    Args:
        cmd: The command.
        log: The log file (the command line first, then stdout and stderr together).
        timeout: Seconds before the whole group is ended.
        env: The environment.

    Returns:
        ``(exit status, timed out)``. Leftover processes of the group are ended either way,
        so none holds GPU memory into the next part.
    """
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=ROOT, env=env, start_new_session=True)  # fmt: skip
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return proc.returncode, True
        except BaseException:  # Ctrl-C: end the part, then let the caller report
            kill_group(proc)
            raise
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return returncode, False


# ---------------------------------------------------------------------------------- summary
def key_numbers(result: PartResult) -> str:
    """A part's key numbers in one table cell."""
    n = result.numbers
    if not n:
        return ""
    if result.name == "env":
        return env_line(n)
    if result.name == "gpu-tests":
        if "tests" not in n:
            return ""
        return (
            f"{n['passed']} passed, {n['failed']} failed, {n['errors']} errors, "
            f"{n['skipped']} skipped"
        )
    if result.name.startswith("throughput-"):
        if n.get("tokens_per_s") is None:
            return ""
        return (
            f"{n['tokens_per_s']:,.0f} tokens/s, {n['ms_per_step']:,.1f} ms/step, "
            f"{fmt_memory(n)} peak, MFU {n['mfu']:.1%} (micro-batch {n['micro_batch']}, "
            f"seq {n['seq']}); anchor {n['anchor_tokens_per_s']:,.0f}"
        )
    if result.name == "loss-memory":
        peaks = [f"{k} {n[k]['peak_mib']:,.0f}" for k in ("naive", "chunked", "fused") if k in n]
        ratios = [
            f"{k}/naive {n[f'{k}_ratio']:.3f} ({n[f'{k}_verdict']})"
            for k in ("chunked", "fused")
            if f"{k}_ratio" in n
        ]
        return "; ".join(filter(None, ["peak extra MiB: " + ", ".join(peaks) if peaks else "",
                                       ", ".join(ratios)]))  # fmt: skip
    if result.name == "fsdp2-smoke":
        if "steps" not in n:
            return ""
        loss = n.get("final_loss")
        return (
            f"{n['steps']} steps ({n.get('strategy')}, {n.get('precision')}, "
            f"{n.get('accelerator')}), final loss {loss:.4g}; sharded checkpoint, export "
            f"{'matches' if n.get('export_matches') else 'differs'}; fit {n.get('fit_s', 0):.0f} s"
            if isinstance(loss, float)
            else f"{n['steps']} steps"
        )
    return ""


def throughput_table(results: dict[str, PartResult], cpu_check: bool) -> list[str]:
    """The throughput rows next to the issue's anchors."""
    lines = [
        "| step | micro-batch x seq | tokens/s | ms/step | peak memory | MFU | MFU (teacher+"
        "student) | anchor tokens/s | vs anchor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    device = None
    for kind in ("lrc", "plain"):
        result = results.get(f"throughput-{kind}")
        anchor, label = ANCHORS[kind]
        if result is None:
            continue
        n = result.numbers
        if result.status != "ok" or n.get("tokens_per_s") is None:
            lines.append(
                f"| {kind} | {result.status}: {result.reason or ''} | | | | | | "
                f"{anchor:,.0f} ({label}) | |"
            )
            continue
        device = n.get("device_name")
        ratio = f"{n['anchor_ratio']:.3f}" + ("" if n.get("anchor_comparable") else " *")
        lines.append(
            f"| {kind} | {n['micro_batch']} x {n['seq']} | {n['tokens_per_s']:,.0f} "
            f"| {n['ms_per_step']:,.1f} | {fmt_memory(n)} | {n['mfu']:.1%} "
            f"| {n['mfu_model_only']:.1%} | {n['anchor_tokens_per_s']:,.0f} ({label}) | {ratio} |"
        )
    lines.append(f"| student alone, CE (anchor only) | | | | | | | {ANCHOR_STUDENT_CE:,.0f} | |")
    lines.append("")
    lines.append(
        "Anchors: the issue's, one H100 80GB, bf16, the default shape (3B teacher -> 1.5B "
        "student, seq 2048). * not comparable: "
        + (
            "CPU mode at a tiny shape."
            if cpu_check
            else f"measured on {device or 'this device'}, not an H100 (or not the default "
            "shape/bf16-mixed); the ratio is for orientation only."
        )
    )
    return lines


def summary_markdown(
    results: list[PartResult], env_info: Numbers, cpu_check: bool, started: str, seconds: float
) -> str:
    """The run's ``summary.md``."""
    failed = [r for r in results if r.status != "ok"]
    mode = "GPU"
    if cpu_check:
        mode = "CPU check (tiny shapes: the numbers only show that each part runs)"
    verdict = "all parts ok" if not failed else f"{len(failed)} of {len(results)} parts not ok"
    lines = [
        "# lrkd GPU suite",
        "",
        f"Mode: {mode}. Started {started}, took {seconds:.0f} s: **{verdict}**.",
        "",
    ]
    if env_info:
        lines += [f"Environment: {env_line(env_info)}.", ""]
        if env_info.get("git"):
            lines += [f"Checkout: {env_info['checkout']} at {env_info['git']}.", ""]
        lines += [f"Warning: {note}." for note in env_info.get("warnings", [])]
        lines += [""] if env_info.get("warnings") else []
    lines += [
        "| # | part | status | seconds | limit s | key numbers |",
        "|---:|---|---|---:|---:|---|",
    ]
    for i, r in enumerate(results, 1):
        numbers = key_numbers(r)
        extra = r.reason if r.status != "ok" else r.note
        cell = "; ".join(filter(None, [numbers, extra])).replace("|", "\\|")
        lines.append(
            f"| {i} | {r.name} | {r.status} | {r.seconds:.0f} | {r.timeout_s:.0f} | {cell} |"
        )
    by_name = {r.name: r for r in results}
    if any(name.startswith("throughput-") for name in by_name):
        lines += ["", "## Throughput", "", *throughput_table(by_name, cpu_check)]
    loss = by_name.get("loss-memory")
    if loss is not None and loss.numbers.get("table"):
        lines += ["", "## Loss memory", "", "```", *loss.numbers["table"], "```"]
    tests = by_name.get("gpu-tests")
    if tests is not None and tests.numbers.get("failures"):
        lines += ["", "## Failed GPU tests", ""]
        lines += [f"- {f}" for f in tests.numbers["failures"]]
    if failed:
        lines += ["", "## Parts not ok", ""]
        for r in failed:
            lines += [f"### {r.name}: {r.status}", "", f"{r.reason or ''}", ""]
            if r.log:
                lines += [f"Log: `{r.log}`; command: `{r.command}`", ""]
            if r.log_tail:
                lines += ["```", *r.log_tail, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_summary(
    out: Path,
    results: list[PartResult],
    env_info: Numbers,
    cpu_check: bool,
    started: str,
    seconds: float,
) -> str:
    """Writes ``summary.md`` and ``summary.json`` into ``out``; returns the markdown."""
    markdown = summary_markdown(results, env_info, cpu_check, started, seconds)
    (out / "summary.md").write_text(markdown)
    payload = {
        "mode": "cpu-check" if cpu_check else "gpu",
        "started": started,
        "seconds": seconds,
        "ok": all(r.status == "ok" for r in results),
        "env": env_info,
        "anchors": {
            "lrc": ANCHORS["lrc"][0],
            "plain": ANCHORS["plain"][0],
            "student_ce": ANCHOR_STUDENT_CE,
        },
        "parts": [asdict(r) for r in results],
    }
    (out / "summary.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return markdown


# ---------------------------------------------------------------------------------- fsdp2
def make_tiny_teacher(path: Path) -> None:
    """A tiny random Llama (vocab 128, hidden 64, 2 layers) and a character-level tokenizer,
    saved as a Hugging Face directory: no network (tests/conftest.py makes the same kind)."""
    import string

    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )  # fmt: skip
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)


def smoke_config(work: Path, teacher: Path, cpu: bool) -> Numbers:
    """The smoke run's config (the strategy comes from ``configs/strategies/fsdp2_bf16.yaml``)."""
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 4, "limit_val_batches": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(work / "runs"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(work / "runs"), "name": "smoke",
                                     "version": 0}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(work / "ckpt"), "save_last": True}},
                {"class_path": "lrkd.callbacks.export.ExportStudent",
                 "init_args": {"dirpath": str(work / "student")}},
            ],
        },
        "model": {
            "teacher": str(teacher),
            "student": {"class_path": "lrkd.models.lowrank.LowRankCloneBuilder",
                        "init_args": {"hidden_size": 32}},
            "loss": {"ce_weight": 0.5, "clone_weight": 0.2},
        },
        "data": {
            "class_path": "lrkd.data.text.TextDataModule",
            "init_args": {"seq_length": 32 if cpu else 64, "batch_size": 2 if cpu else 4,
                          "builtin_documents": 100, "cache_dir": str(work / "cache")},
        },
    }  # fmt: skip


def train_losses(metrics_csv: Path) -> list[float]:
    """The ``train/loss`` values a CSVLogger wrote, by step."""
    import csv

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return [float(row["train/loss"]) for row in rows if row.get("train/loss")]


def weight_difference(a: Path, b: Path) -> float:
    """The largest difference between two exported students' tensors, relative to each
    tensor's largest magnitude (``inf`` when their names or shapes differ)."""
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    left, right = tensors(a), tensors(b)
    if not left or left.keys() != right.keys():
        return math.inf
    worst = 0.0
    for name, x in left.items():
        y = right[name]
        if x.shape != y.shape:
            return math.inf
        scale = max(float(y.float().abs().max()), 1e-12)
        worst = max(worst, float((x.float() - y.float()).abs().max()) / scale)
    return worst


def fsdp2_worker(work: Path, cpu: bool) -> int:
    """The ``fsdp2-smoke`` part: ``lrkd fit`` under FSDP2 bf16 on one device, then checks.

    Prints :data:`RESULT_MARKER` and a JSON object: ``ok``, ``problem`` and the numbers.

    Args:
        work: A scratch folder (created).
        cpu: On the CPU (gloo) instead of one GPU (NCCL).

    Returns:
        0 when every check passed, else 1.
    """
    import yaml

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result: Numbers = {"ok": False, "problem": None, "accelerator": "cpu" if cpu else "gpu"}

    def finish(problem: str | None = None) -> int:
        result.update(ok=problem is None, problem=problem)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0 if problem is None else 1

    teacher = work / "teacher"
    make_tiny_teacher(teacher)
    config = work / "smoke.yaml"
    config.write_text(yaml.safe_dump(smoke_config(work, teacher, cpu)))
    strategy = ROOT / "configs" / "strategies" / "fsdp2_bf16.yaml"
    settings = yaml.safe_load(strategy.read_text())["trainer"]
    result.update(
        strategy=settings["strategy"]["class_path"].rsplit(".", 1)[-1],
        precision=settings["precision"],
    )
    cmd = [sys.executable, "-m", "lrkd.cli", "fit", "--config", str(config), "--config",
           str(strategy), "--trainer.devices", "1"]  # fmt: skip
    if cpu:
        cmd += ["--trainer.accelerator", "cpu"]
    print(f"$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    fit = subprocess.run(cmd, check=False)
    result["fit_s"] = time.perf_counter() - start
    if fit.returncode != 0:
        return finish(f"lrkd fit exited {fit.returncode}")

    metrics = work / "runs" / "smoke" / "version_0" / "metrics.csv"
    losses = train_losses(metrics) if metrics.is_file() else []
    result.update(steps=len(losses), losses=losses, final_loss=losses[-1] if losses else None)
    if len(losses) != 4 or not all(math.isfinite(x) for x in losses):
        return finish(f"expected 4 finite train/loss values in {metrics}, got {losses}")
    last = work / "ckpt" / "last.ckpt"
    result["sharded_checkpoint"] = last.is_dir()
    if not last.is_dir():
        return finish(f"{last} is not a sharded checkpoint folder (FSDP2 writes one)")

    exported = work / "exported"
    cmd = [sys.executable, "-m", "lrkd.cli", "export", "--ckpt_path", str(last), "--out",
           str(exported)]  # fmt: skip
    print(f"$ {shlex.join(cmd)}", flush=True)
    if subprocess.run(cmd, check=False).returncode != 0:
        return finish("lrkd export of the sharded checkpoint failed")
    # ExportStudent multiplies the clone out under the run's bf16-mixed precision, lrkd export
    # in float32: the two agree within bf16 rounding (2**-8 relative), not bit for bit.
    difference = weight_difference(work / "student", exported)
    result.update(export_difference=difference, export_matches=difference <= EXPORT_TOLERANCE)
    if not result["export_matches"]:
        return finish(
            f"lrkd export of last.ckpt differs from the student ExportStudent wrote by "
            f"{difference:.3g} (relative; tolerance {EXPORT_TOLERANCE})"
        )

    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(exported)
    result["student_hidden_size"] = student.config.hidden_size
    with torch.no_grad():
        logits = student(torch.tensor([[1, 40, 41, 42]])).logits
    if not torch.isfinite(logits).all():
        return finish("the exported student's logits are not finite")
    return finish()


# ---------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(
        prog="gpu_suite",
        description=__doc__.split("\n\n")[0],
        epilog="Parts: " + ", ".join(PARTS) + ". See the module docstring for what each does.",
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help="Folder for the logs and summary (default: $OUT if set, else gpu_suite_out).",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-check", action="store_true",
        help="Tiny CPU rehearsal of every part (no GPU needed; numbers are not benchmarks).",
    )  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART",
                        help="Run only these parts (in the suite's order).")  # fmt: skip
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="Multiply every part's time limit (default 1).")  # fmt: skip
    parser.add_argument("--part-timeout", action="append", default=[], metavar="PART=SECONDS",
                        help="Set one part's time limit (repeatable).")  # fmt: skip
    parser.add_argument(
        "--throughput-args", default="",
        help='Extra arguments for both throughput runs, e.g. --throughput-args="--micro-batch 2 '
        '--activation-checkpointing".',
    )  # fmt: skip
    parser.add_argument("--inject-failure", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--fsdp2-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.timeout_scale <= 0:
        parser.error("--timeout-scale must be positive")
    args.timeouts = dict(CPU_TIMEOUTS if args.cpu_check else GPU_TIMEOUTS)
    args.timeouts = {k: v * args.timeout_scale for k, v in args.timeouts.items()}
    for item in args.part_timeout:
        part, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if part not in PARTS or value <= 0:
            parser.error(f"--part-timeout {item!r}: expected PART=SECONDS with PART in {PARTS}")
        args.timeouts[part] = value
    args.inject = {}
    for item in args.inject_failure:
        part, _, how = item.partition(":")
        if part not in PARTS or how not in ("", "hang"):
            parser.error(f"--inject-failure {item!r}: expected PART or PART:hang")
        args.inject[part] = how or "fail"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the suite.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        0 when every part is ok, 1 when one is not, 2 when the suite could not start.
    """
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # this checkout's lrkd, as the children get it
    if args.fsdp2_worker is not None:
        return fsdp2_worker(args.fsdp2_worker, args.cpu_check)

    missing = missing_modules(REQUIRED_MODULES)
    if missing:
        return fail_fast(
            f"cannot import {', '.join(missing)} with {sys.executable}; activate lrkd's "
            "environment (pip install -e '.[test]') and run again"
        )
    absent = [name for name in REQUIRED_FILES if not (ROOT / name).is_file()]
    if absent:
        return fail_fast(f"this checkout ({ROOT}) lacks {', '.join(absent)}")
    if not args.cpu_check:
        problem = cuda_problem()
        if problem is not None:
            return fail_fast(problem)
    notes = [] if args.cpu_check else gpu_warnings()
    out = args.out or Path(os.environ.get("OUT") or "gpu_suite_out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        out = out.resolve()
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        return fail_fast(f"cannot write the output folder {out}: {err.strerror or err}")

    parts = [p for p in PARTS if args.only is None or p in args.only]
    throughput_args = shlex.split(args.throughput_args)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    suite = Suite(out, work, args.cpu_check, args.timeouts, args.inject, throughput_args)
    limit = sum(args.timeouts[p] for p in parts)
    mode = "CPU check (tiny shapes)" if args.cpu_check else "GPU"
    print(f"gpu_suite: {len(parts)} parts, {mode}, at most {limit / 60:.1f} min; logs and "
          f"summary in {out}", flush=True)  # fmt: skip
    for note in notes:
        print(f"gpu_suite: warning: {note}", flush=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    results = [PartResult(name=p, timeout_s=args.timeouts[p]) for p in parts]
    interrupted = False
    try:
        for i, part in enumerate(parts):
            print(f"[{i + 1}/{len(parts)}] {part} ...", end=" ", flush=True)
            try:
                results[i] = suite.run_part(part)
            except KeyboardInterrupt:
                results[i].status, results[i].reason = "interrupted", "Ctrl-C"
                interrupted = True
                print("interrupted", flush=True)
                break
            r = results[i]
            tail = f": {r.reason}" if r.reason else ""
            more = "" if r.status == "ok" else f" (log: {r.log})"
            print(f"{r.status} ({r.seconds:.0f} s){tail}{more}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env_info = suite.env_info
    if not env_info:  # env not run (--only) or failed: the header still names the machine
        try:
            env_info = environment(args.cpu_check)
        except Exception:
            env_info = {}
    if notes:
        env_info["warnings"] = notes
    markdown = write_summary(out, results, env_info, args.cpu_check, started,
                             time.perf_counter() - start)  # fmt: skip
    print()
    print(markdown, end="", flush=True)
    print(f"\ngpu_suite: wrote {out / 'summary.md'} and {out / 'summary.json'}", flush=True)
    if interrupted:
        return 130
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
