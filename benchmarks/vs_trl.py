"""lrkd's default KD step against TRL's GKDTrainer and a bare PyTorch loop, on this machine.

The same job three ways, each timed in its own fresh process, the processes alternating
(``trl, bare, lrkd, trl, bare, lrkd, ...``) so that a machine's slow minute hits all of them:

- ``trl``: ``trl``'s GKDTrainer with ``lmbda=0`` (no student generations: off-policy) and
  ``beta=0`` (forward KL), ``training_step`` (its ``compute_loss``, its backward) then a
  gradient clip and a step of its own AdamW, as ``Trainer.train`` would do them
  (``trl_gkd.py``, shared with ``throughput.py --trl``);
- ``bare``: a plain PyTorch loop: teacher forward under ``torch.inference_mode``, student
  forward, full-vocabulary log-softmaxes of both, forward KL over the target tokens, backward,
  clip, AdamW;
- ``lrkd``: ``lrkd.module.DistillationModule`` in a ``lightning.Trainer`` as ``lrkd fit`` builds
  it, at lrkd's defaults: ``trainer.precision`` and ``teacher_dtype: auto`` (bf16 where the
  CPU probe finds bf16 matmuls clearly faster, :mod:`lrkd.hardware`), the chunked loss.

Setting: the built-in teacher SmolLM2-135M-Instruct (hidden 576, 30 layers, vocab 49152; fetched
and converted once into ``~/.cache/lrkd``) and a random student of its architecture at hidden
192 (``FromTeacherConfig(hidden_size=192)``: 3 heads, 1 KV head, FFN 512, 30 layers), batch
8 x 128 random tokens, every position after the first a target, forward KL only, AdamW lr 1e-4,
gradient-norm clip 1.0. ``trl`` and ``bare`` run at ``--precision`` (default: what lrkd's
probe picks on this machine, i.e. each tool at this machine's best; ``bf16-mixed`` means
autocast around the forward and a bf16 teacher), ``lrkd`` at its own default unless
``--lrkd-precision`` is given (which then sets its teacher's dtype too).

Reported per kind: tokens/s (the best round: another process on the machine can only slow a
round down; every round's value is shown too), ms/step, peak RSS of the whole process (the
memory a user sees; also its growth from just before the models were built), and MFU: model
FLOPs per token (teacher forward + student forward and backward, counted as in
``throughput.py``) x tokens/s / the matmul ceiling measured in the same process.

Example::

    python benchmarks/vs_trl.py                      # the issue's setting, 2 rounds
    python benchmarks/vs_trl.py --tiny --rounds 1    # tiny random teacher (tests)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

KINDS = ("trl", "bare", "lrkd")
RESULT_MARKER = "VS_TRL_RESULT "
GIB = 2**30
TEACHER = "smollm2-135m-instruct"
STUDENT_HIDDEN = 192
LR = 1e-4
CLIP = 1.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--rounds", type=int, default=2, help="Fresh processes per kind.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed optimizer steps.")
    parser.add_argument("--steps", type=int, default=3, help="Timed optimizer steps.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--precision",
        choices=("auto", "32-true", "bf16-mixed"),
        default="auto",
        help="trl's and bare's precision (auto: lrkd's CPU probe decides, as for lrkd).",
    )
    parser.add_argument(
        "--lrkd-precision",
        choices=("auto", "32-true", "bf16-mixed"),
        default="auto",
        help="lrkd's precision (auto: its default, the probe's choice).",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="A tiny random teacher instead of SmolLM2 (tests)."
    )
    parser.add_argument("--ceiling-size", type=int, default=1024, help="Matmul size n.")
    parser.add_argument("--json", type=Path, default=None, help="Write the numbers here.")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--teacher-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be at least 1, --warmup at least 0.")
    return args


# ---------------------------------------------------------------------------------- worker
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolved_precision(value: str) -> str:
    """``auto`` as lrkd resolves it on this machine; other values as given."""
    from lrkd.hardware import auto_precision

    return auto_precision() if value == "auto" else value


def load_models(teacher_dir: str, precision: str) -> tuple[Any, Any]:
    """The frozen teacher (bf16 under bf16-mixed) and the seeded random student."""
    import torch

    from lrkd.models.students import FromTeacherConfig
    from lrkd.models.teachers import frozen_teacher

    dtype = "bfloat16" if precision.startswith("bf16") else "float32"
    teacher, _ = frozen_teacher(teacher_dir, dtype)
    student = FromTeacherConfig(hidden_size=STUDENT_HIDDEN, seed=0)(teacher)
    return teacher, student.to(torch.float32).train()


def make_batches(vocab: int, batch: int, seq: int, count: int) -> list[dict[str, Any]]:
    """``count`` batches of random token ids; ``loss_mask`` marks every position a target."""
    import torch

    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        ones = torch.ones_like(ids)
        out.append({"input_ids": ids, "attention_mask": ones, "loss_mask": ones.clone()})
    return out


def autocast_for(precision: str) -> Any:
    """The forward's autocast context: bf16 on the CPU, or a no-op."""
    import contextlib

    import torch

    if precision.startswith("bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bare_steps(teacher_dir: str, precision: str, batches: list[dict[str, Any]]) -> Callable:
    """A plain PyTorch forward-KL step; returns ``run(batch) -> loss``."""
    import torch
    import torch.nn.functional as F

    teacher, student = load_models(teacher_dir, precision)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)

    def run(batch: dict[str, Any]) -> float:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.inference_mode(), autocast_for(precision):
            teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with autocast_for(precision):
            student_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
        log_q = F.log_softmax(student_logits.float(), dim=-1)
        log_p = F.log_softmax(teacher_logits.float(), dim=-1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return run


def trl_steps(teacher_dir: str, precision: str, batches: list[dict[str, Any]]) -> Callable:
    """TRL GKDTrainer's step (lmbda 0, beta 0); returns ``run(batch) -> loss``."""
    import torch
    from trl_gkd import gkd_batch, gkd_trainer

    from lrkd.models.teachers import load_tokenizer

    teacher, student = load_models(teacher_dir, precision)
    trainer = gkd_trainer(
        student, teacher, load_tokenizer(teacher_dir),
        micro_batch=len(batches[0]["input_ids"]), max_length=batches[0]["input_ids"].shape[1],
        bf16=precision.startswith("bf16"), use_cpu=True, learning_rate=LR, max_grad_norm=CLIP,
    )  # fmt: skip
    model = trainer.model
    trainer.create_optimizer()  # TRL's own AdamW over the student, lr 1e-4, as train() makes it
    optimizer = trainer.optimizer

    def run(batch: dict[str, Any]) -> float:
        with autocast_for(precision):
            loss = trainer.training_step(model, gkd_batch(batch))
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return run


def lrkd_run(
    teacher_dir: str, precision: str, batches: list[dict[str, Any]], warmup: int,
    teacher_dtype: str = "auto",
) -> tuple[float, list[float], str]:  # fmt: skip
    """lrkd's step in a Lightning Trainer; returns (timed seconds, every step's loss, teacher
    dtype)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lrkd.models.students import FromTeacherConfig
    from lrkd.module import DistillationModule
    from lrkd.objective import Loss

    module = DistillationModule(
        teacher=teacher_dir,
        student=FromTeacherConfig(hidden_size=STUDENT_HIDDEN, seed=0),
        loss=Loss(divergence="forward_kl", kd_weight=1.0, ce_weight=0.0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
        teacher_dtype=teacher_dtype,
    )
    times: dict[str, float] = {}
    losses: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                times["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))
            times["end"] = time.perf_counter()

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=len(batches),
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Clock()],
    )
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    teacher_dtype = str(next(module.teacher.parameters()).dtype).removeprefix("torch.")
    return times["end"] - times["start"], losses, teacher_dtype


def matmul_ceiling(dtype: Any, size: int) -> float:
    """Best of a few square matmuls in ``dtype`` on the CPU, TFLOP/s."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def flops_per_token(teacher_dir: str, seq: int) -> float:
    """Teacher forward + student forward and backward, per token (``throughput.py``'s count:
    2 FLOPs per multiply-add of every linear layer, the LM head, and causal attention)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lrkd.models.students import FromTeacherConfig

    config = AutoConfig.from_pretrained(teacher_dir)
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
        student = FromTeacherConfig(hidden_size=STUDENT_HIDDEN)(teacher)

    def forward(model: Any) -> float:
        c = model.config
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        tied = head is embed  # parameters() counts a tied matrix once
        params = sum(p.numel() for p in model.parameters())
        nonembed = params - embed.numel() - (0 if tied else head.numel())
        q = c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
        return 2 * nonembed + 2 * head.numel() + 2 * c.num_hidden_layers * seq * q

    return forward(teacher) + 3 * forward(student)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measures one kind (``args.worker``) in this process."""
    import torch

    kind = args.worker
    precision = resolved_precision(args.lrkd_precision if kind == "lrkd" else args.precision)
    ceiling_dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    ceiling = matmul_ceiling(ceiling_dtype, args.ceiling_size)
    rss_before = peak_rss_bytes()
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.teacher_dir).vocab_size
    batches = make_batches(vocab, args.batch, args.seq, args.warmup + args.steps)
    if kind == "lrkd":
        # A precision given for lrkd sets its teacher's dtype too (as for trl and bare); at its
        # default both follow the probe.
        chosen = "auto" if args.lrkd_precision == "auto" else ("bfloat16" if precision.startswith(
            "bf16") else "float32")  # fmt: skip
        elapsed, losses, teacher_dtype = lrkd_run(args.teacher_dir, precision, batches,
                                                  args.warmup, chosen)  # fmt: skip
    else:
        build = trl_steps if kind == "trl" else bare_steps
        run = build(args.teacher_dir, precision, batches)
        losses = [run(batch) for batch in batches[: args.warmup]]
        start = time.perf_counter()
        losses += [run(batch) for batch in batches[args.warmup :]]
        elapsed = time.perf_counter() - start
        teacher_dtype = "bfloat16" if precision.startswith("bf16") else "float32"
    peak = peak_rss_bytes()
    tokens_per_s = args.steps * args.batch * args.seq / elapsed
    flops = flops_per_token(args.teacher_dir, args.seq)
    return {
        "kind": kind,
        "precision": precision,
        "teacher_dtype": teacher_dtype,
        "threads": torch.get_num_threads(),
        "tokens_per_s": tokens_per_s,
        "ms_per_step": elapsed / args.steps * 1e3,
        "peak_rss_bytes": peak,
        "rss_growth_bytes": peak - rss_before,
        "ceiling_tflops": ceiling,
        "ceiling_dtype": str(ceiling_dtype).removeprefix("torch."),
        "flops_per_token": flops,
        "mfu": flops * tokens_per_s / 1e12 / ceiling,
        "losses": losses,  # every step's, warm-up included
    }


# ---------------------------------------------------------------------------------- parent
def measure(kind: str, args: argparse.Namespace, teacher_dir: str) -> dict[str, Any]:
    """Runs one kind in a fresh interpreter and returns its measurements (or an error)."""
    argv = [
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--batch", str(args.batch),
        "--seq", str(args.seq), "--precision", args.precision,
        "--lrkd-precision", args.lrkd_precision, "--ceiling-size", str(args.ceiling_size),
        "--teacher-dir", teacher_dir, "--worker", kind,
    ]  # fmt: skip
    from workers import run_worker as run_fresh

    return run_fresh(Path(__file__).resolve(), argv, RESULT_MARKER, kind)


def tiny_teacher(folder: Path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer files replaced by a tiny one (tests)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "a": 3, "b": 4}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}a{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    return str(folder)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind: the best round's tokens/s, ms/step and MFU, and the largest peak RSS."""
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        done = [r for r in rows if r["kind"] == kind and "error" not in r]
        if not done:
            continue
        out[kind] = {
            "precision": done[0]["precision"],
            "teacher_dtype": done[0]["teacher_dtype"],
            "tokens_per_s": max(r["tokens_per_s"] for r in done),
            "tokens_per_s_rounds": [r["tokens_per_s"] for r in done],
            "ms_per_step": min(r["ms_per_step"] for r in done),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in done),
            "rss_growth_bytes": max(r["rss_growth_bytes"] for r in done),
            "mfu": max(r["mfu"] for r in done),
            "ceiling_tflops": statistics.median(r["ceiling_tflops"] for r in done),
            "ceiling_dtype": done[0]["ceiling_dtype"],
            "first_loss": done[0]["losses"][0],
        }
    return out


LABELS = {
    "trl": "TRL GKDTrainer (lmbda 0, beta 0)",
    "bare": "bare PyTorch loop",
    "lrkd": "lrkd DistillationModule in a Lightning Trainer (defaults)",
}


def table_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The comparison as a markdown table, with ratios to TRL."""
    trl = summary.get("trl")
    lines = [
        "| step | precision (teacher) | tokens/s (rounds) | ms/step | peak RSS | RSS growth "
        "| MFU | vs TRL speed | vs TRL peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, s in summary.items():
        rounds = ", ".join(f"{x:,.0f}" for x in s["tokens_per_s_rounds"])
        speed = f"{s['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else "n/a"
        rss = f"{s['peak_rss_bytes'] / trl['peak_rss_bytes']:.2f}x" if trl else "n/a"
        lines.append(
            f"| {LABELS[kind]} | {s['precision']} ({s['teacher_dtype']}) "
            f"| {s['tokens_per_s']:,.0f} ({rounds}) | {s['ms_per_step']:,.0f} "
            f"| {s['peak_rss_bytes'] / GIB:.2f} GB | {s['rss_growth_bytes'] / GIB:.2f} GB "
            f"| {s['mfu']:.1%} | {speed} | {rss} |"
        )
    return lines


def machine_line() -> str:
    """The CPU, its threads, and lrkd's probe of its bf16 speed."""
    import torch

    from lrkd.env import cpu_description
    from lrkd.hardware import cpu_bf16_probe

    probe = cpu_bf16_probe()
    return (
        f"machine: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, capability {torch.backends.cpu.get_cpu_capability()}; bf16 matmul "
        f"{probe.speedup:.2f}x fp32 ({probe.source}); python {platform.python_version()}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the alternating rounds and prints the table.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        Process exit code: 0 when every run was measured.
    """
    args = parse_args(argv)
    if args.worker is not None:
        print(RESULT_MARKER + json.dumps(run_worker(args)), flush=True)
        return 0
    if "trl" in args.kinds and importlib_missing("trl"):
        print("vs_trl: trl is not installed (pip install -e '.[bench]'); drop --kinds trl "
              "to compare without it.", file=sys.stderr)  # fmt: skip
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            teacher_dir = tiny_teacher(Path(tmp) / "teacher")
        else:
            from lrkd.models.zoo import builtin_path

            teacher_dir = str(builtin_path(TEACHER))
        print(machine_line(), flush=True)
        rows = []
        for round_ in range(args.rounds):
            for kind in args.kinds:
                row = measure(kind, args, teacher_dir)
                rows.append(row)
                said = row.get("error") or f"{row['tokens_per_s']:,.0f} tokens/s"
                print(f"round {round_ + 1}/{args.rounds} {kind}: {said}", flush=True)
    summary = summarise(rows)
    setting = (
        f"setting: teacher {'tiny random' if args.tiny else TEACHER} -> random student hidden "
        f"{STUDENT_HIDDEN}, batch {args.batch} x {args.seq}, forward KL, AdamW lr {LR:g}, clip "
        f"{CLIP:g}; warm-up {args.warmup}, timed {args.steps} steps per process, "
        f"{args.rounds} rounds alternating; MFU vs the {args.ceiling_size}^3 matmul ceiling "
        "measured in each process"
    )
    print(setting)
    print()
    print("\n".join(table_lines(summary)))
    print()
    print(
        "first-step loss (same teacher, student and batch, before any update; equal up to "
        "rounding when the precisions match): "
        + ", ".join(f"{kind} {s['first_loss']:.6f}" for kind, s in summary.items())
    )
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"{r['kind']} FAILED: {r['error']}\n{r.get('stderr', '')[-2000:]}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine_line(), "setting": setting, "summary": summary, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if errors else 0


def importlib_missing(name: str) -> bool:
    """Whether ``name`` cannot be imported."""
    import importlib.util

    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
