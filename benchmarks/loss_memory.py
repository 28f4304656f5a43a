"""Peak extra CPU memory of the chunked KD loss against a naive full-softmax implementation.

Each implementation runs forward + backward in its own fresh process. The process allocates
(and so touches) the student and teacher logits, records ``ru_maxrss`` as its baseline, runs the
loss, and reports the growth of ``ru_maxrss``: the peak extra memory of the loss, gradient
included.

Example::

    python benchmarks/loss_memory.py --batch 4 --length 2048 --vocab 49152 --kind forward_kl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

PASS_RATIO = 0.25
DTYPES = ("float32", "bfloat16", "float16")
IMPLEMENTATIONS = ("naive", "chunked")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    from lrkd.losses import DIVERGENCE_KINDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="Sequences per batch.")
    parser.add_argument("--length", type=int, default=2048, help="Tokens per sequence.")
    parser.add_argument("--vocab", type=int, default=49152, help="Vocabulary size.")
    parser.add_argument("--kind", choices=DIVERGENCE_KINDS, default="forward_kl")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Logits dtype.")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="Rows per chunk (default: automatic)."
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)."
    )
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def max_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive_loss(student, teacher, kind: str):
    """Unchunked reference: full float32 log-softmaxes and plain autograd."""
    import torch.nn.functional as F

    from lrkd.losses import _divergence_rows

    if kind == "forward_kl":
        log_q = F.log_softmax(student.float(), dim=-1)
        log_p = F.log_softmax(teacher.float(), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    # Other kinds: the library's own per-row formula, applied to the whole tensor at once.
    values = _divergence_rows(
        student.float(), teacher.float(), kind=kind, temperature=1.0, beta=0.5, skew_alpha=0.1
    )
    return values.mean()


def run_worker(args: argparse.Namespace) -> dict[str, float]:
    """Measures one implementation in this process.

    Args:
        args: Parsed arguments; ``args.worker`` names the implementation.

    Returns:
        Peak extra memory (MiB), wall time (ms) and the loss value.
    """
    import torch

    from lrkd.losses import kd_divergence

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.length, args.vocab)
    student = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(shape, generator=generator, dtype=dtype)
    baseline = max_rss_mib()

    start = time.perf_counter()
    if args.worker == "naive":
        loss = naive_loss(student, teacher, args.kind)
    else:
        loss = kd_divergence(
            student, teacher, args.kind, chunk_size=args.chunk_size, reduction="mean"
        )
    loss.backward()
    elapsed_ms = (time.perf_counter() - start) * 1e3

    assert student.grad is not None and student.grad.dtype == dtype
    return {"peak_mib": max_rss_mib() - baseline, "ms": elapsed_ms, "loss": loss.item()}


def measure(implementation: str, argv: list[str]) -> dict[str, float]:
    """Runs one implementation in a fresh interpreter and returns its measurements."""
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--worker", implementation],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{implementation} worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Runs both implementations and prints the comparison.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        Process exit code: 0 when the chunked peak is at most a quarter of the naive one.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(args)))
        return 0

    tokens = args.batch * args.length
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    input_mib = tokens * args.vocab * itemsize / 2**20
    print(
        f"kind={args.kind} batch={args.batch} length={args.length} vocab={args.vocab} "
        f"dtype={args.dtype} chunk_size={args.chunk_size or 'auto'}"
    )
    print(f"each input (and the student gradient): {input_mib:.0f} MiB")

    results = {name: measure(name, argv) for name in IMPLEMENTATIONS}
    print(f"{'implementation':<16}{'peak extra MiB':>16}{'time ms':>12}{'loss':>14}")
    for name, result in results.items():
        print(f"{name:<16}{result['peak_mib']:>16.0f}{result['ms']:>12.0f}{result['loss']:>14.6f}")

    ratio = results["chunked"]["peak_mib"] / results["naive"]["peak_mib"]
    verdict = "PASS" if ratio <= PASS_RATIO else "FAIL"
    print(f"chunked/naive peak ratio: {ratio:.3f} ({verdict}: threshold {PASS_RATIO})")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
