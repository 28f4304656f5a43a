"""Data at scale: prepare speed, time to the first batch, and peak memory of `lrkd fit` as the
corpus grows (issue 20).

Steps, each printing one row of the table:

1. **corpus**: JSONL shards of the built-in generator's documents, about ``--tokens`` SmolLM2
   tokens each size (default 10M and 100M);
2. **prepare**: ``lrkd prepare`` with ``--num_proc`` processes (default 2): wall time and
   tokens/s;
3. **first batch**: a fresh process opens the prepared directory and draws one training batch:
   seconds from the start of the process, and from ``setup()``;
4. **fit RSS**: peak resident memory of ``lrkd fit --config configs/plain_kd.yaml`` for
   ``--steps`` steps on each prepared size, and, with ``--old_commit``, of the in-memory data
   path of that commit on the smallest size (the files given as ``data.train_files``).

Usage::

    python benchmarks/data_scale.py --work /tmp/data_scale            # 10M and 100M tokens
    python benchmarks/data_scale.py --work /tmp/ds --tokens 1e6 --steps 3  # a quick look
    python benchmarks/data_scale.py --work /tmp/ds --old_commit 53d7f44   # + the old path

The corpora and prepared directories stay under ``--work`` (about 4.5 bytes of disk per token
for both); a second run reuses them (a prepared directory is never prepared twice).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = "smollm2-135m-instruct"
BYTES_PER_TOKEN = 3.0  # the built-in corpus under SmolLM2's tokenizer, measured
SEQ_LENGTH = 128  # configs/plain_kd.yaml's


def write_corpus(out: Path, tokens: float, shards: int = 8) -> list[Path]:
    """JSONL shards of built-in documents, about ``tokens`` tokens in all (written once)."""
    from lrkd.data.corpus import builtin_corpus

    files = [out / f"part-{i:03d}.jsonl" for i in range(shards)]
    if all(f.exists() for f in files):
        return files
    out.mkdir(parents=True, exist_ok=True)
    per_shard = int(tokens * BYTES_PER_TOKEN / shards)
    for i, f in enumerate(files):
        size, seed = 0, 1000 * i
        with f.with_suffix(".tmp").open("w") as w:
            while size < per_shard:
                lines = [json.dumps({"text": doc}) + "\n" for doc in builtin_corpus(1000, seed)]
                w.write("".join(lines))
                size += sum(map(len, lines))
                seed += 1
        f.with_suffix(".tmp").rename(f)
    return files


def run_timed(argv: list[str]) -> float:
    """Run ``argv`` (failing loudly): its wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def peak_rss(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds and peak RSS in MB of ``argv``: in all (the kernel's accounting), and the
    peaks of its anonymous and file-backed parts (``/proc/PID/status``, sampled every 0.1 s;
    file-backed pages are the memory-mapped data, shared and reclaimable)."""
    start = time.perf_counter()
    cwd.mkdir(parents=True, exist_ok=True)
    log = (cwd / "fit.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip
    peaks = {"RssAnon": 0, "RssFile": 0}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            key = line.split(":")[0]
            if key in peaks:
                peaks[key] = max(peaks[key], int(line.split()[1]))
        time.sleep(0.1)
    if status:
        raise SystemExit(f"{' '.join(argv)} failed: see {cwd / 'fit.log'}")
    total = usage.ru_maxrss // 1024
    return {"peak RSS MB": total, "peak anon MB": peaks["RssAnon"] // 1024,
            "peak file-backed MB": peaks["RssFile"] // 1024,
            "wall s": round(time.perf_counter() - start, 1)}  # fmt: skip


def first_batch(prepared: Path) -> tuple[float, float]:
    """(seconds from process start, seconds from setup()) to the first training batch."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "from lrkd.data.text import TextDataModule\n"
        f"dm = TextDataModule(prepared={str(prepared)!r}, tokenizer={TOKENIZER!r}, "
        f"seq_length={SEQ_LENGTH}, batch_size=4)\n"
        "t1 = time.perf_counter(); dm.setup('fit')\n"
        "batch = next(iter(dm.train_dataloader())); t2 = time.perf_counter()\n"
        "assert batch['input_ids'].shape == (4, %d)\n"
        "print(t2 - t0, t2 - t1)\n" % SEQ_LENGTH
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    from_setup = float(out.stdout.split()[-1])
    return time.perf_counter() - start, from_setup  # the first counts the interpreter's start


def fit_argv(steps: int, config: Path, data: list[str]) -> list[str]:
    """``lrkd fit`` of ``config`` for ``steps`` steps (its outputs under ``runs/`` of the
    working directory)."""
    return [
        sys.executable, "-m", "lrkd.cli", "fit", "--config", str(config),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", *data,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="corpora and prepared data")
    parser.add_argument("--tokens", type=float, nargs="+", default=[1e7, 1e8])
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="lrkd fit steps for the RSS")
    parser.add_argument("--old_commit", help="also measure this commit's in-memory data path")
    parser.add_argument("--skip_fit", action="store_true")
    args = parser.parse_args()
    rows = []
    prepared_dirs = {}
    for tokens in args.tokens:
        name = f"{tokens / 1e6:g}M"
        files = write_corpus(args.work / f"corpus-{name}", tokens)
        out = args.work / f"prepared-{name}"
        wall = run_timed(
            [sys.executable, "-m", "lrkd.cli", "prepare", "--train_files",
             json.dumps([str(f) for f in files]), "--tokenizer", TOKENIZER,
             "--seq_length", str(SEQ_LENGTH), "--val_fraction", "0.001",
             "--num_proc", str(args.num_proc), "--out", str(out)]
        )  # fmt: skip
        manifest = json.loads((out / "manifest.json").read_text())
        total = sum(split["tokens"] for split in manifest["splits"].values())
        source_mb = sum(f.stat().st_size for f in files) / 2**20
        disk_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
        start_s, setup_s = first_batch(out)
        prepared_dirs[name] = out
        rows.append({"corpus": name, "tokens": total, "source MB": round(source_mb),
                     "prepared MB": round(disk_mb), "prepare s": manifest["seconds"],
                     "procs": manifest["num_proc"], "lrkd prepare s (this run)": round(wall, 1),
                     "tokens/s": round(total / manifest["seconds"]),
                     "first batch s (process)": round(start_s, 2),
                     "first batch s (setup)": round(setup_s, 2)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_fit:
        for name, out in prepared_dirs.items():
            argv = fit_argv(args.steps, ROOT / "configs/plain_kd.yaml",
                            ["--data.prepared", str(out)])  # fmt: skip
            memory = peak_rss(argv, args.work / f"runs-{name}")
            rows.append({"fit": f"prepared {name}", "steps": args.steps, **memory})
            print(json.dumps(rows[-1]), flush=True)
        if args.old_commit:
            name = f"{min(args.tokens) / 1e6:g}M"
            old = args.work / f"lrkd-{args.old_commit}"
            if not old.exists():
                subprocess.run(["git", "worktree", "add", "--detach", str(old), args.old_commit],
                               cwd=ROOT, check=True)  # fmt: skip
            files = sorted((args.work / f"corpus-{name}").glob("*.jsonl"))
            argv = fit_argv(
                args.steps,
                old / "configs/plain_kd.yaml",
                ["--data.train_files", json.dumps([str(f) for f in files])],
            )
            memory = peak_rss(argv, args.work / f"runs-old-{name}", {"PYTHONPATH": str(old)})
            rows.append({"fit": f"in-memory {name} ({args.old_commit})", "steps": args.steps,
                         **memory})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print()
    for row in rows:
        print(" | ".join(f"{k}: {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
