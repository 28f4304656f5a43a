"""Rank sweep: held-out KL(teacher || student) of Low-Rank Clones of several widths at several
token budgets, beside the rank advisor's r* = c * sqrt(n) and the teacher's spectral tail.

The theory behind lrkd (docs/theory.md) says the best rank grows like sqrt(n) with the number
of training tokens n: a wider student can represent more of the teacher (the spectral tail of
its hidden states beyond the width shrinks), but has more to learn from the same data. This
script puts that against data with the built-in teacher (SmolLM2-135M-Instruct, fp32):

- one LowRankClone per width (activation-PCA init, KL + 0.5 CE + 0.2 clone, as the
  quickstart), trained on the same built-in-corpus batches in the same order;
- a constant learning rate, so that the model after the first n tokens of the longest run is
  the model a run with budget n would have produced: one run per width serves every budget;
- held-out KL(teacher || student), nats/token, on fixed validation batches at every budget;
- per width: the teacher's spectral tail (mean over layers) and the width r* the advisor
  suggests at each budget.

    python benchmarks/rank_sweep.py --widths 36 72 144 288 --budgets 7680 30720 \\
        --out docs/figures/rank_sweep
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from plotting import pyplot

from lrkd.data.text import TextDataModule
from lrkd.diagnostics.rank import DEFAULT_C, rank_report, suggested_rank
from lrkd.losses import kd_divergence
from lrkd.models.lowrank import LowRankCloneBuilder
from lrkd.models.teachers import load_teacher
from lrkd.module import DistillationModule
from lrkd.objective import Loss, next_token_targets


@torch.no_grad()
def heldout_kl(module: DistillationModule, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-mean KL(teacher || student) over the target positions of ``batches``."""
    module.eval()
    total, count = 0.0, 0
    for batch in batches:
        out = module.student(batch["input_ids"], batch["attention_mask"], with_teacher=True)
        _, mask = next_token_targets(batch)
        total += float(kd_divergence(out.logits, out.teacher_logits, "forward_kl", mask=mask,
                                     reduction="sum"))  # fmt: skip
        count += int(mask.sum())
    module.train()
    return total / count


def run(width: int, teacher: torch.nn.Module, train: list, val: list, budgets: list[int],
        args: argparse.Namespace) -> dict:  # fmt: skip
    """Train one width up to the largest budget; held-out KL at 0 and at every budget."""
    torch.manual_seed(args.seed)
    student = LowRankCloneBuilder(hidden_size=width, init=args.init, probe_tokens=4096,
                                  clone_loss="relative_mse", seed=args.seed)  # fmt: skip
    module = DistillationModule(
        teacher, student, teacher_dtype="float32", loss=Loss(ce_weight=0.5, clone_weight=0.2)
    )
    params = [p for p in module.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    tokens_per_step = args.batch_size * args.seq_length
    kl = {0: heldout_kl(module, val)}
    print(f"  width {width}: {sum(p.numel() for p in params):,} trainable, KL@0 {kl[0]:.3f}",
          flush=True)  # fmt: skip
    start = time.perf_counter()
    steps = max(budgets) // tokens_per_step
    module.train()
    for step in range(1, steps + 1):
        terms = module.distillation_loss(train[step - 1])
        terms["loss"].backward()
        module.on_before_optimizer_step(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step * tokens_per_step in budgets:
            kl[step * tokens_per_step] = heldout_kl(module, val)
            print(f"  width {width}: {step * tokens_per_step} tokens, KL "
                  f"{kl[step * tokens_per_step]:.3f}", flush=True)  # fmt: skip
    return {"width": width, "kl": kl, "seconds": time.perf_counter() - start,
            "trainable": sum(p.numel() for p in params)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[36, 72, 144, 288])
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[7680, 30720],
        help="Training-token budgets (multiples of batch x sequence).",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--init", default="activation_pca")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--c", type=float, default=DEFAULT_C)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/rank_sweep"))
    args = parser.parse_args()
    tokens_per_step = args.batch_size * args.seq_length
    budgets = sorted(args.budgets)
    if any(b % tokens_per_step for b in budgets):
        parser.error(f"--budgets must be multiples of {tokens_per_step} (batch x sequence)")

    teacher = load_teacher("smollm2-135m-instruct", dtype=torch.float32)
    data = TextDataModule(tokenizer="smollm2-135m-instruct", seq_length=args.seq_length,
                          batch_size=args.batch_size, builtin_documents=3000,
                          val_fraction=0.05)  # fmt: skip
    data.setup("fit")
    train_iter = iter(data.train_dataloader())
    train = [next(train_iter) for _ in range(max(budgets) // tokens_per_step)]
    val_iter = iter(data.val_dataloader())
    val = [next(val_iter) for _ in range(args.val_batches)]

    report = rank_report(teacher, num_tokens=max(budgets), c=args.c, widths=args.widths)
    tails = {row.width: row.tail_mean for row in report.rows}
    results = [run(w, teacher, train, val, budgets, args) for w in args.widths]

    suggested = {b: suggested_rank(b, args.c) for b in budgets}
    print(f"\nHeld-out KL(teacher || student), nats/token; {len(val)} validation batches of "
          f"{args.batch_size} x {args.seq_length}; init {args.init}, constant lr {args.lr}, "
          f"seed {args.seed}\n")  # fmt: skip
    header = " | ".join(f"KL @ {b:,} tokens" for b in budgets)
    print(f"| width | trainable | spectral tail (mean over layers) | KL @ 0 | {header} |")
    print("|---:|---:|---:|---:|" + "---:|" * len(budgets))
    for r in results:
        cells = " | ".join(f"{r['kl'][b]:.3f}" for b in budgets)
        print(f"| {r['width']} | {r['trainable']:,} | {tails[r['width']]:.4f} | "
              f"{r['kl'][0]:.3f} | {cells} |")  # fmt: skip
    best = {b: min(results, key=lambda r: r["kl"][b])["width"] for b in budgets}
    for b in budgets:
        print(f"budget {b:,} tokens: best width {best[b]}; r* = c*sqrt(n) = {suggested[b]:.1f} "
              f"(c = {args.c}); c that would put r* at the best width: "
              f"{best[b] / b**0.5:.3f}")  # fmt: skip

    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.with_suffix(".json").write_text(json.dumps(
        {"config": config, "tails": tails, "suggested": suggested, "best": best,
         "results": results}, indent=1))  # fmt: skip
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    widths = [r["width"] for r in results]
    for b in [0, *budgets]:
        axes[0].plot(widths, [r["kl"][b] for r in results], marker="o",
                     label=f"{b:,} tokens" if b else "at init")  # fmt: skip
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("student width d_S")
    axes[0].set_ylabel("held-out KL(teacher || student)")
    axes[0].legend()
    axes[1].plot(widths, [tails[w] for w in widths], marker="o", color="gray")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("student width d_S")
    axes[1].set_ylabel("teacher spectral tail beyond d_S")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Rank sweep: SmolLM2-135M-Instruct -> LowRankClone")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
