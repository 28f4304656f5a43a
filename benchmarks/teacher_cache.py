"""Training from an offline top-k teacher cache against online distillation, on this machine.

One invocation prepares the built-in corpus with the teacher's tokenizer, builds teacher caches
of it (``lrkd.data.cache_teacher.cache_teacher``) at several k, trains the same student from the
same seed on the same batches for the same number of steps, online (teacher in the loop) and
from each cache, and scores every trained student against the teacher's full distribution on
held-out blocks.

Setting: the built-in teacher SmolLM2-135M-Instruct (hidden 576, 30 layers, vocab 49152) and the
plain student of ``configs/plain_kd.yaml`` (``FromTeacherConfig(hidden_size=192,
num_hidden_layers=6, seed=0)``); blocks of ``--seq`` tokens of the built-in corpus (just enough
documents for ``--steps`` x ``--batch`` training blocks, and ``--val-blocks`` held-out ones);
forward KL (``--ce-weight`` 0 by default: the KD signal alone), AdamW lr 3e-3 and weight decay
0.01 (constant), gradient clip 1.0, ``--precision`` 32-true. The online teacher and the caches'
teacher run in ``--teacher-dtype`` float32, so that a cache holds exactly the online teacher's
log-probabilities (stored in ``--logprob-dtype`` float16).

What runs where:

- the parent prepares the data and builds the caches one after another (each build's seconds
  are the manifest's: teacher forwards, top-k, writing and assembling; the whole call,
  teacher loading included, and the cores the parent got meanwhile are reported too);
- each training variant (``online``, then ``cache k=...``) runs in its own fresh interpreter
  (``workers.run_worker``): a ``lightning.Trainer`` fitting a ``DistillationModule`` on a
  ``TextDataModule``, as ``lrkd fit`` does. A callback times every step: ``step ms`` is the
  median, over the steps after ``--warmup``, of the time from one step's end to the next's (data
  loading included: a cache's batches carry [B, L, k] teacher tensors), ``compute ms`` the
  median of on_train_batch_start to on_train_batch_end. Peak RSS is the process's peak
  (``VmHWM``; see :func:`peak_rss_bytes`) at the end of training, and its growth is from just
  before the module was built. The CPU seconds per wall second over the timed steps and the
  load average are recorded too: fewer busy cores than torch threads means something else ran
  on the machine. The worker saves the trained student's weights;
- the parent then loads the teacher in float32 and, on the first ``--val-blocks`` blocks of the
  held-out split, computes per target token KL(teacher || student) against the full
  vocabulary and the student's next-token CE, for every trained student and the untrained one.

A full-vocabulary cache (k = V) stores ``2*V + 2*(V+1)`` bytes per target token with uint16 ids
and float16 log-probs (V ids, V log-probs, one tail); at V = 49152 that is 196,610 bytes, so it
is not built over the training data: its size is computed, and checked by building one over
``--full-vocab-docs`` documents (0: computed only). When V is one of ``--ks`` (``--tiny``: V =
128) that cache is the full-vocabulary one, built and trained like the others.

Example::

    python benchmarks/teacher_cache.py                 # default setting (~10 min, 2 cores)
    python benchmarks/teacher_cache.py --tiny          # tiny random teacher (tests)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT_MARKER = "TEACHER_CACHE_RESULT "
TEACHER = "smollm2-135m-instruct"
STUDENT = {"hidden_size": 192, "num_hidden_layers": 6, "seed": 0}
TINY_STUDENT = {"hidden_size": 32, "num_hidden_layers": 1, "seed": 0}
LR = 3e-3
WEIGHT_DECAY = 0.01
CLIP = 1.0
SEED = 0
BUILD_BATCH = 8
EVAL_BATCH = 4
#: Defaults that differ with --tiny: steps, warm-up steps, sequence length, held-out blocks.
DEFAULTS = {"steps": 60, "warmup": 5, "seq": 128, "val_blocks": 32}
TINY_DEFAULTS = {"steps": 6, "warmup": 2, "seq": 32, "val_blocks": 8}
GB = 1e9
MB = 1e6


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        The parsed arguments, ``--tiny``'s defaults filled in.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128], help="Cache top-k.")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps (60; tiny 6).")
    parser.add_argument(
        "--warmup", type=int, default=None, help="Steps left out of the step time (5; tiny 2)."
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None, help="Tokens per block (128; tiny 32).")
    parser.add_argument(
        "--val-blocks", type=int, default=None, help="Held-out blocks scored (32; tiny 8)."
    )
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument(
        "--teacher-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="The online teacher's and the caches' teacher's dtype.",
    )
    parser.add_argument("--logprob-dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--ce-weight", type=float, default=0.0, help="Next-token CE weight.")
    parser.add_argument(
        "--full-vocab-docs",
        type=int,
        default=8,
        help="Documents a measured k=V cache is built over when V is not in --ks (0: none).",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="A tiny random teacher instead of SmolLM2 (tests)."
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Keep the data, caches and students here."
    )
    parser.add_argument("--json", type=Path, default=None, help="Write the numbers here.")
    parser.add_argument("--worker", choices=("online", "cache"), help=argparse.SUPPRESS)
    parser.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--student-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in (TINY_DEFAULTS if args.tiny else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.warmup < 0 or args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1 (at least two timed steps).")
    if min(args.ks) < 1 or args.batch < 1 or args.seq < 2 or args.val_blocks < 1:
        parser.error("--ks, --batch and --val-blocks must be at least 1, --seq at least 2.")
    return args


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux's ``VmHWM``, not ``ru_maxrss``: a process started by fork and exec inherits in
    ``ru_maxrss`` its parent's peak at the fork, and this benchmark's parent has held the
    teacher by then. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def student_builder(tiny: bool) -> Any:
    """The student of ``configs/plain_kd.yaml`` (a one-layer hidden-32 one with ``--tiny``)."""
    from lrkd.models.students import FromTeacherConfig

    return FromTeacherConfig(**(TINY_STUDENT if tiny else STUDENT))


# ---------------------------------------------------------------------------------- worker
def train_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Trains the student online (``args.worker == "online"``) or from the cache at
    ``args.data`` in this process, and saves its weights to ``args.student_out``.

    Args:
        args: The worker's arguments.

    Returns:
        The run's measurements.
    """
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lrkd.data.text import TextDataModule
    from lrkd.module import DistillationModule
    from lrkd.objective import Loss

    class StepClock(Callback):
        """Every step's start and end times, its loss, and a digest of the batches' tokens."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.cpu: list[float] = []
            self.losses: list[float] = []
            self.digest = hashlib.sha256()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.digest.update(batch["input_ids"].numpy().tobytes())
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.losses.append(float(outputs["loss"]))

    rss_before = peak_rss_bytes()
    seed_everything(SEED)
    loss = Loss(divergence="forward_kl", kd_weight=1.0, ce_weight=args.ce_weight)

    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

    built = time.perf_counter()
    if args.worker == "online":
        module = DistillationModule(
            teacher=args.teacher,
            student=student_builder(args.tiny),
            loss=loss,
            teacher_dtype=args.teacher_dtype,
            optimizer=optimizer,
        )
        tokenizer = args.teacher
        teacher_dtype = str(next(module.teacher.parameters()).dtype).removeprefix("torch.")
    else:
        module = DistillationModule(
            student=student_builder(args.tiny),
            loss=loss,
            teacher_cache=args.data,
            optimizer=optimizer,
        )
        tokenizer = str(Path(args.data) / "teacher")
        teacher_dtype = "cache"
    build_s = time.perf_counter() - built
    data = TextDataModule(
        prepared=args.data,
        tokenizer=tokenizer,
        seq_length=args.seq,
        batch_size=args.batch,
        seed=SEED,
    )
    clock = StepClock()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        gradient_clip_val=CLIP,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    began = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_s = time.perf_counter() - began
    peak = peak_rss_bytes()
    torch.save(module.student.state_dict(), args.student_out)
    timed = range(args.warmup, len(clock.ends))
    step_s = statistics.median(clock.ends[i] - clock.ends[i - 1] for i in timed if i > 0)
    compute_s = statistics.median(clock.ends[i] - clock.starts[i] for i in timed)
    first = max(args.warmup - 1, 0)
    # CPU seconds per wall second over the timed steps: the cores this process got (below
    # torch's thread count when something else ran on the machine).
    busy = (clock.cpu[-1] - clock.cpu[first]) / (clock.ends[-1] - clock.ends[first])
    return {
        "kind": args.worker,
        "steps": len(clock.ends),
        "precision": args.precision,
        "teacher_dtype": teacher_dtype,
        "threads": torch.get_num_threads(),
        "cores_busy": busy,
        "load_average": os.getloadavg()[0],
        "step_ms": step_s * 1e3,
        "compute_ms": compute_s * 1e3,
        "tokens_per_s": args.batch * args.seq / step_s,
        "fit_s": fit_s,
        "module_build_s": build_s,
        "peak_rss_bytes": peak,
        "rss_growth_bytes": peak - rss_before,
        "losses": clock.losses,
        "data_digest": clock.digest.hexdigest(),
    }


# ---------------------------------------------------------------------------------- parent
def tiny_teacher(folder: Path) -> str:
    """The tests' tiny random Llama (vocab 128) and character tokenizer, saved to ``folder``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_llama, make_tokenizer

    make_tiny_llama(seed=0).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def tokens_per_document(tokenizer: Any) -> float:
    """Mean tokens per document of the built-in corpus (EOS included), from a sample."""
    from lrkd.data.corpus import builtin_corpus

    sample = builtin_corpus(200, seed=SEED)
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    return sum(len(x) + 1 for x in ids) / len(ids)


def prepare_data(
    root: Path, tokenizer: Any, tokenizer_name: str, args: argparse.Namespace
) -> tuple[Path, dict[str, Any]]:
    """The built-in corpus prepared in blocks of ``args.seq`` tokens, with just enough documents
    for ``steps x batch`` training blocks and ``val_blocks`` held-out ones.

    Returns:
        The prepared directory and its manifest's splits.

    Raises:
        RuntimeError: no corpus size gave enough blocks of both splits.
    """
    from lrkd.data.manifest import PrepareSettings, read_manifest
    from lrkd.data.prepare import prepare

    need = {"train": args.steps * args.batch, "val": args.val_blocks}
    per_doc = {split: tokens_per_document(tokenizer) for split in need}
    for _ in range(6):
        # Margins: blocks are packed across documents and the last partial block is dropped.
        docs = {s: math.ceil(need[s] * args.seq * 1.05 / per_doc[s]) + 2 for s in need}
        total = docs["train"] + docs["val"]
        settings = PrepareSettings(
            seq_length=args.seq,
            builtin_documents=total,
            val_fraction=docs["val"] / total,
            seed=SEED,
        )
        out = prepare(
            None,
            root / f"prepared-{total}-{docs['val']}",
            tokenizer,
            settings,
            tokenizer_name=tokenizer_name,
        )
        splits = read_manifest(out)["splits"]
        if all(splits[s]["examples"] >= need[s] for s in need):
            return out, splits
        per_doc = {s: splits[s]["tokens"] / splits[s]["records"] * 0.95 for s in need}
    raise RuntimeError(f"the built-in corpus gave too few blocks: {splits}, need {need}")


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_cache(
    prepared: Path, out: Path, teacher: str, k: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Builds the top-``k`` cache of ``prepared`` at ``out`` and returns its numbers."""
    from lrkd.data.cache_teacher import cache_teacher
    from lrkd.data.teacher_cache import read_teacher_cache

    began, cpu = time.perf_counter(), time.process_time()
    cache_teacher(
        prepared,
        out,
        teacher,
        top_k=k,
        teacher_dtype=args.teacher_dtype,
        logprob_dtype=args.logprob_dtype,
        batch_size=BUILD_BATCH,
        device="cpu",
    )
    wall = time.perf_counter() - began
    busy = (time.process_time() - cpu) / wall
    info = read_teacher_cache(out)
    return {
        "k": k,
        "vocab_size": info.vocab_size,
        "bytes_per_token": info.bytes_per_token,
        "formula_bytes_per_token": formula_bytes(k, info.vocab_size, args.logprob_dtype),
        "build_s": info.seconds,
        "build_call_s": wall,
        "build_cores_busy": busy,
        "target_tokens": info.target_tokens,
        "size_bytes": dir_bytes(out),
        "teacher_files_bytes": dir_bytes(out / "teacher"),
    }


def formula_bytes(k: int, vocab: int, logprob_dtype: str) -> int:
    """Bytes per target token of a top-k cache: k ids, k log-probs and one tail log-prob."""
    id_bytes = 2 if vocab <= 1 << 16 else 4
    value_bytes = 2 if logprob_dtype == "float16" else 4
    return id_bytes * k + value_bytes * (k + 1)


def full_vocab_measurement(
    root: Path, tokenizer: Any, teacher: str, vocab: int, args: argparse.Namespace
) -> dict[str, Any]:
    """A k=V cache built over ``args.full_vocab_docs`` documents (deleted afterwards)."""
    from lrkd.data.manifest import PrepareSettings
    from lrkd.data.prepare import prepare

    settings = PrepareSettings(
        seq_length=args.seq, builtin_documents=args.full_vocab_docs, val_fraction=0.0, seed=SEED
    )
    small = prepare(None, root / "prepared-full-vocab", tokenizer, settings, tokenizer_name=teacher)
    out = root / "cache-full-vocab"
    measured = build_cache(small, out, teacher, vocab, args)
    shutil.rmtree(out)
    return measured


def measure(
    kind: str, data: Path, teacher: str, student_out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Trains one variant in a fresh interpreter and returns its measurements (or an error)."""
    from workers import run_worker as run_fresh

    argv = [
        "--worker", kind, "--teacher", teacher, "--data", str(data),
        "--student-out", str(student_out), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
        "--val-blocks", str(args.val_blocks), "--precision", args.precision,
        "--teacher-dtype", args.teacher_dtype, "--ce-weight", str(args.ce_weight),
        *(["--tiny"] if args.tiny else []),
    ]  # fmt: skip
    return run_fresh(Path(__file__).resolve(), argv, RESULT_MARKER, kind)


def evaluate(
    teacher: str, prepared: Path, students: dict[str, Path | None], args: argparse.Namespace
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Held-out forward KL(teacher || student) against the teacher's full distribution and the
    student's CE, per target token, on the first ``val_blocks`` held-out blocks.

    Args:
        teacher: the teacher (loaded here in float32).
        prepared: the prepared directory whose ``val`` split is scored.
        students: name -> saved weights of a trained student, or ``None`` for the untrained one.
        args: The parsed arguments.

    Returns:
        Per student ``kl`` and ``ce``; and the teacher's own ``ce``, the blocks and the target
        tokens scored.
    """
    import torch
    import torch.nn.functional as F

    from lrkd.data.prepared import PreparedExamples
    from lrkd.data.tokens import pad_collate
    from lrkd.models.students import model_logits
    from lrkd.models.teachers import frozen_teacher
    from lrkd.objective import next_token_targets

    model, tokenizer = frozen_teacher(teacher, "float32")
    models = {}
    for name, path in students.items():
        student = student_builder(args.tiny)(model).float().eval()
        if path is not None:
            student.load_state_dict(torch.load(path, weights_only=True))
        models[name] = student
    val = PreparedExamples(prepared / "val")
    blocks = min(args.val_blocks, len(val))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kl = dict.fromkeys(models, 0.0)
    ce = dict.fromkeys(models, 0.0)
    teacher_ce, count = 0.0, 0
    with torch.inference_mode():
        for first in range(0, blocks, EVAL_BATCH):
            indices = list(range(first, min(first + EVAL_BATCH, blocks)))
            batch = pad_collate(val.__getitems__(indices), pad)
            targets, mask = next_token_targets(batch)
            ids, attention = batch["input_ids"], batch["attention_mask"]
            labels = targets[mask]
            log_p = F.log_softmax(model_logits(model, ids, attention)[mask].float(), dim=-1)
            p = log_p.exp()
            teacher_ce -= float(log_p.gather(-1, labels[:, None]).sum())
            count += int(mask.sum())
            for name, student in models.items():
                logits = model_logits(student, ids, attention)[mask].float()
                log_q = F.log_softmax(logits, dim=-1)
                kl[name] += float((p * (log_p - log_q)).sum())
                ce[name] -= float(log_q.gather(-1, labels[:, None]).sum())
    scores = {name: {"kl": kl[name] / count, "ce": ce[name] / count} for name in models}
    return scores, {"teacher_ce": teacher_ce / count, "blocks": blocks, "target_tokens": count}


def fmt_bytes(n: float) -> str:
    """A size in GB or MB."""
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"


def table_lines(result: dict[str, Any]) -> list[str]:
    """The comparison as a markdown table."""
    runs, scores, caches = result["runs"], result["scores"], result["caches"]
    online = runs.get("online", {})
    lines = [
        "| variant | k | bytes/token | cache size | build s | step ms | tokens/s "
        "| speed-up vs online | peak RSS (growth) | held-out KL to full teacher | held-out CE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def score(name: str) -> str:
        s = scores.get(name)
        return f"{s['kl']:.4f} | {s['ce']:.4f}" if s else "n/a | n/a"

    def timing(name: str) -> str:
        run = runs.get(name)
        if run is None:
            return "not trained | | |"
        if "error" in run:
            return "FAILED | | |"
        speed = f"{online['step_ms'] / run['step_ms']:.2f}x" if "step_ms" in online else "n/a"
        return (
            f"{run['step_ms']:,.0f} | {run['tokens_per_s']:,.0f} | {speed} "
            f"| {fmt_bytes(run['peak_rss_bytes'])} (+{fmt_bytes(run['rss_growth_bytes'])})"
        )

    lines.append(f"| untrained student (reference) | | | | | | | | | {score('initial')} |")
    lines.append(
        f"| online (teacher in the loop, {online.get('teacher_dtype', '?')}) "
        f"| V (full) | | | | {timing('online')} | {score('online')} |"
    )
    for cache in caches:
        k = cache["k"]
        name = f"cache k={k}"
        k_cell = f"{k} (= V)" if k == cache["vocab_size"] else str(k)
        lines.append(
            f"| {name} | {k_cell} | {cache['bytes_per_token']:,.1f} "
            f"| {fmt_bytes(cache['size_bytes'])} | {cache['build_s']:,.1f} "
            f"| {timing(name)} | {score(name)} |"
        )
    full = result.get("full_vocab")
    if full is not None:
        tokens = caches[0]["target_tokens"] if caches else 0
        computed = full["formula_bytes_per_token"]
        measured = full.get("measured")
        if measured:
            per_token = (
                f"{computed:,} computed; {measured['bytes_per_token']:,.1f} measured "
                f"on {measured['target_tokens']:,} tokens"
            )
            build = f"{measured['build_s']:,.1f} for {measured['target_tokens']:,} tokens only"
        else:
            per_token, build = f"{computed:,} computed (not built)", "not built"
        lines.append(
            f"| full-vocabulary cache (not trained) | {full['vocab_size']} (= V) | {per_token} "
            f"| {fmt_bytes(computed * tokens)} computed for {tokens:,} tokens | {build} "
            "| not trained | | | | n/a | n/a |"
        )
    return lines


def machine_line() -> str:
    """The CPU, torch and its threads."""
    import torch

    from lrkd.env import cpu_description

    return (
        f"machine: {cpu_description()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; python {platform.python_version()}"
    )


def run_all(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Prepares, builds, trains and evaluates every variant under ``root``."""
    import datasets

    from lrkd.models.teachers import load_tokenizer

    datasets.disable_progress_bars()
    teacher = tiny_teacher(root / "teacher") if args.tiny else TEACHER
    tokenizer = load_tokenizer(teacher)
    prepared, splits = prepare_data(root, tokenizer, teacher, args)
    print(
        f"data: {prepared.name}: train {splits['train']['examples']} blocks, val "
        f"{splits['val']['examples']} blocks of {args.seq} tokens",
        flush=True,
    )
    caches = []
    for k in args.ks:
        cache = build_cache(prepared, root / f"cache-k{k}", teacher, k, args)
        caches.append(cache)
        said = f"{cache['bytes_per_token']:.1f} bytes/token, {fmt_bytes(cache['size_bytes'])}"
        print(f"built k={k}: {said}, {cache['build_s']:.1f} s", flush=True)
    vocab = caches[0]["vocab_size"]
    full = None
    if vocab not in args.ks:
        full = {
            "vocab_size": vocab,
            "formula_bytes_per_token": formula_bytes(vocab, vocab, args.logprob_dtype),
        }
        if args.full_vocab_docs > 0:
            full["measured"] = full_vocab_measurement(root, tokenizer, teacher, vocab, args)
    runs: dict[str, dict[str, Any]] = {}
    students: dict[str, Path | None] = {"initial": None}
    variants = [("online", "online", prepared)]
    variants += [(f"cache k={k}", "cache", root / f"cache-k{k}") for k in args.ks]
    for name, kind, data in variants:
        out = root / f"student-{name.replace(' ', '-').replace('=', '')}.pt"
        run = measure(kind, data, teacher, out, args)
        runs[name] = run
        said = run.get("error") or f"{run['step_ms']:,.0f} ms/step"
        print(f"trained {name}: {said}", flush=True)
        if "error" not in run:
            students[name] = out
    scores, reference = evaluate(teacher, prepared, students, args)
    data = {"prepared": str(prepared), "splits": splits, "size_bytes": dir_bytes(prepared)}
    return {
        "data": data,
        "caches": caches,
        "full_vocab": full,
        "runs": runs,
        "scores": scores,
        "reference": reference,
    }


def setting_line(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """What was run, in one line."""
    student = ", ".join(f"{k}={v}" for k, v in (TINY_STUDENT if args.tiny else STUDENT).items())
    teacher = "tiny random Llama (vocab 128)" if args.tiny else TEACHER
    reference = result["reference"]
    return (
        f"setting: teacher {teacher} ({args.teacher_dtype}) -> student "
        f"FromTeacherConfig({student}); {args.steps} steps of {args.batch} x {args.seq} tokens, "
        "the same blocks in the same order for every variant; forward KL (kd 1, ce "
        f"{args.ce_weight:g}), AdamW lr {LR:g} wd {WEIGHT_DECAY:g} constant, clip {CLIP:g}, "
        f"precision {args.precision}; caches: {args.logprob_dtype} log-probs; step ms: median "
        f"step end to step end over steps {args.warmup + 1}..{args.steps} (data loading "
        "included), one fresh process per variant; tokens/s: batch x seq / step; held-out: "
        f"{reference['target_tokens']:,} target tokens of {reference['blocks']} val blocks, the "
        "teacher in float32"
    )


def note_lines(result: dict[str, Any]) -> list[str]:
    """The checks and the numbers that do not fit the table."""
    runs = {name: r for name, r in result["runs"].items() if "error" not in r}
    digests = {r["data_digest"] for r in runs.values()}
    lines = [
        f"teacher's own held-out CE: {result['reference']['teacher_ce']:.4f}; the same training "
        f"batches in every run: {'yes' if len(digests) == 1 else 'NO'}; prepared data alone: "
        f"{fmt_bytes(result['data']['size_bytes'])}, "
        f"{result['caches'][0]['target_tokens'] if result['caches'] else 0:,} target tokens",
        "cache build s: the manifest's (teacher forwards, top-k, writing); whole calls with "
        "teacher loading: "
        + ", ".join(
            f"k={c['k']} {c['build_call_s']:.1f} s ({c['build_cores_busy']:.2f} cores busy)"
            for c in result["caches"]
        ),
    ]
    if result["caches"]:
        files = result["caches"][0]["teacher_files_bytes"]
        lines.append(
            "cache size: all its files: the top-k columns (bytes/token x target tokens), the "
            f"blocks' input_ids and teacher/ (config and tokenizer, {fmt_bytes(files)})"
        )
    for name, r in runs.items():
        lines.append(
            f"{name}: compute {r['compute_ms']:,.0f} ms/step (data loading excluded), fit "
            f"{r['fit_s']:.0f} s, train loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, "
            f"{r['cores_busy']:.2f} cores busy of {r['threads']} threads, load average "
            f"{r['load_average']:.2f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints the table.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        Process exit code: 0 when every variant was trained and scored.
    """
    args = parse_args(argv)
    if args.worker is not None:
        print(RESULT_MARKER + json.dumps(train_worker(args)), flush=True)
        return 0
    began = time.perf_counter()
    command = "python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}", flush=True)
    print(machine_line(), flush=True)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run_all(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="lrkd-teacher-cache-") as tmp:
            result = run_all(args, Path(tmp))
    wall = time.perf_counter() - began
    setting = setting_line(args, result)
    print(setting)
    print()
    print("\n".join(table_lines(result)))
    print()
    print("\n".join(note_lines(result)))
    print(f"total wall time: {wall:.0f} s")
    errors = {name: r for name, r in result["runs"].items() if "error" in r}
    for name, r in errors.items():
        print(f"{name} FAILED: {r['error']}\n{r.get('stderr', '')[-2000:]}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command,
            "machine": machine_line(),
            "setting": setting,
            "wall_s": wall,
            **result,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
