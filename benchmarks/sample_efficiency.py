"""Sample efficiency of Low-Rank Clone students against logit KD and CE-only training.

Same teacher (the built-in SmolLM2-135M-Instruct), same student shape (the teacher's 30 layers,
heads, head_dim, FFN width and vocabulary at a smaller hidden size), same data, batch and token
budget. Variants:

- ``lrc_normal``: LowRankClone, the paper's N(0, 0.02) init; KL + CE + alpha * clone.
- ``lrc_pca``: LowRankClone, activation-PCA init; same loss.
- ``kd_random``: a randomly initialised plain student of the same shape; KL + CE.
- ``ce_scratch``: the same random student; next-token CE only.

Every ``--eval-every`` steps: held-out token-level KL(teacher || student) and the student's
next-token CE on fixed validation batches. Prints a table, writes JSON and (with matplotlib)
a PNG plot.

    python benchmarks/sample_efficiency.py --steps 60 --out docs/figures/sample_efficiency
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from plotting import pyplot

from lrkd.data.text import TextDataModule
from lrkd.losses import kd_divergence
from lrkd.models.lowrank import LowRankCloneBuilder
from lrkd.models.protocols import CoRunStudent
from lrkd.models.students import FromTeacherConfig, model_logits
from lrkd.models.teachers import load_teacher
from lrkd.module import DistillationModule
from lrkd.objective import Loss

VARIANTS = ("lrc_normal", "lrc_pca", "kd_random", "ce_scratch")


def build(variant: str, teacher: torch.nn.Module, args: argparse.Namespace) -> DistillationModule:
    """The DistillationModule for one variant (students all of the same shape)."""
    if variant.startswith("lrc"):
        student = LowRankCloneBuilder(
            hidden_size=args.hidden_size,
            init="normal" if variant == "lrc_normal" else "activation_pca",
            probe_tokens=4096,
            clone_loss=args.clone_loss,
            seed=args.seed,
        )
        return DistillationModule(
            teacher,
            student,
            teacher_dtype="float32",
            loss=Loss(ce_weight=0.5, clone_weight=args.clone_weight),
        )
    head_dim = teacher.config.head_dim
    student = FromTeacherConfig(
        hidden_size=args.hidden_size,
        intermediate_size=teacher.config.intermediate_size,
        num_attention_heads=teacher.config.num_attention_heads,
        num_key_value_heads=teacher.config.num_key_value_heads,
        head_dim=head_dim,
        seed=args.seed,
    )
    kd_weight = 0.0 if variant == "ce_scratch" else 1.0
    ce_weight = 1.0 if variant == "ce_scratch" else 0.5
    return DistillationModule(
        teacher,
        student,
        teacher_dtype="float32",
        loss=Loss(kd_weight=kd_weight, ce_weight=ce_weight),
    )


@torch.no_grad()
def evaluate(module: DistillationModule, batches: list[dict[str, torch.Tensor]]) -> dict:
    """Held-out token-mean KL(teacher || student) and student next-token CE."""
    module.eval()
    kl_sum = ce_sum = 0.0
    n = 0
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool()
        if isinstance(module.student, CoRunStudent):
            out = module.student(ids, mask, with_teacher=True)
            s_logits, t_logits = out.logits, out.teacher_logits
        else:
            t_logits = model_logits(module.teacher, ids, mask)
            s_logits = model_logits(module.student, ids, mask)
        s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
        kl = kd_divergence(s_logits, t_logits, "forward_kl", mask=valid, reduction="sum")
        ce = torch.nn.functional.cross_entropy(
            s_logits[valid].float(), targets[valid], reduction="sum"
        )
        kl_sum += kl.item()
        ce_sum += ce.item()
        n += int(valid.sum())
    module.train()
    return {"kl": kl_sum / n, "ce": ce_sum / n}


def run(variant: str, teacher, train_batches, val_batches, args) -> list[dict]:
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    module = build(variant, teacher, args)
    build_s = time.perf_counter() - t0
    params = [p for p in module.student.parameters() if p.requires_grad]
    lr = args.lr_lrc if variant.startswith("lrc") else args.lr_random
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps, lr / 10)
    tokens_per_step = args.batch_size * args.seq_length
    history = [{"step": 0, "tokens": 0, **evaluate(module, val_batches), "seconds": 0.0}]
    print(f"  {variant}: built in {build_s:.1f}s, step 0: {history[-1]}", flush=True)
    module.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        terms = module.distillation_loss(train_batches[(step - 1) % len(train_batches)])
        terms["loss"].backward()
        module.on_before_optimizer_step(optimizer)  # LRC: generated-weight grads -> projections
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            row = {"step": step, "tokens": step * tokens_per_step, **evaluate(module, val_batches)}
            row["seconds"] = elapsed
            history.append(row)
            print(f"  {variant}: step {step}: {row}", flush=True)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=189)
    parser.add_argument("--clone-weight", type=float, default=0.2)
    parser.add_argument("--clone-loss", default="relative_mse")
    parser.add_argument("--lr-lrc", type=float, default=3e-4)
    parser.add_argument("--lr-random", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs/figures/sample_efficiency")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher = load_teacher("smollm2-135m-instruct", dtype=torch.float32)
    data = TextDataModule(
        tokenizer="smollm2-135m-instruct",
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        builtin_documents=3000,
        val_fraction=0.05,
    )
    data.setup("fit")
    train_iter = iter(data.train_dataloader())
    train_batches = [next(train_iter) for _ in range(args.steps)]  # the same data for all
    val_iter = iter(data.val_dataloader())
    val_batches = [next(val_iter) for _ in range(args.val_batches)]

    results = {}
    for variant in args.variants.split(","):
        results[variant] = run(variant, teacher, train_batches, val_batches, args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items()}
    out.with_suffix(".json").write_text(json.dumps({"args": meta, "results": results}, indent=1))

    steps = [row["step"] for row in next(iter(results.values()))]
    header = "| variant | " + " | ".join(
        f"KL @ {s * args.batch_size * args.seq_length} tok" for s in steps
    )
    print("\nHeld-out KL(teacher || student), nats/token (next-token CE in brackets)\n")
    print(header + " | s/step |")
    print("|---" * (len(steps) + 2) + "|")
    for variant, rows in results.items():
        cells = " | ".join(f"{r['kl']:.3f} ({r['ce']:.2f})" for r in rows)
        per_step = rows[-1]["seconds"] / max(1, rows[-1]["step"])
        print(f"| {variant} | {cells} | {per_step:.2f} |")
    print("(s/step: wall time over the run, including the evaluations)")

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant, rows in results.items():
        tokens = [r["tokens"] for r in rows]
        axes[0].plot(tokens, [r["kl"] for r in rows], marker="o", label=variant)
        axes[1].plot(tokens, [r["ce"] for r in rows], marker="o", label=variant)
    axes[0].set_ylabel("held-out KL(teacher || student)")
    axes[1].set_ylabel("held-out next-token CE")
    for ax in axes:
        ax.set_xlabel("training tokens seen")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"SmolLM2-135M -> hidden {args.hidden_size}, batch {args.batch_size}x{args.seq_length}"
    )
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
