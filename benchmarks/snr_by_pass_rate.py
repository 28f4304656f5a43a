"""Gradient SNR against pass rate on the built-in arithmetic problems (the PACED observation).

PACED weights a problem by ``w(p) = p (1 - p)`` because, it argues, problems the student
always or never solves give little consistent gradient signal. This script measures, per
pass-rate bucket, the signal-to-noise ratio of per-problem gradients
(``||mean g|| / spread`` across the bucket's problems, debiased for the finite sample; see
``lrkd.diagnostics.snr``), with the same code as the ``GradientSNRByPassRate`` callback.

Two setups (``--setups``):

- ``lrc``: the distillation of the PACED benchmark: the built-in teacher (SmolLM2-135M-Instruct,
  fp32) and a 504-wide Low-Rank Clone of it (activation-PCA init) that starts with some
  arithmetic competence; the gradient is the one training uses, of forward KL on the teacher's
  greedy response (+ 0.2 x the clone loss) with respect to the clone's trainable parameters.
- ``self``: the built-in model as the student (its own pass rates spread over (0, 1)) and an
  oracle teacher whose distribution is the reference answer: the gradient of the cross-entropy
  of ``" <answer>"`` + EOS after the prompt (forward KL to a point mass) with respect to all
  135M parameters.

Pass rates come from ``--rollouts`` samples per problem at temperature 1 (the DataModule's own
estimator); buckets are the DataModule's (p = 0, (0, .25], (.25, .5], (.5, .75], (.75, 1), p = 1).
Each bucket's SNR uses up to ``--per-bucket`` problems, drawn with ``--seeds`` different seeds
for a spread.

    python benchmarks/snr_by_pass_rate.py --problems 240 --rollouts 8 --per-bucket 12 \\
        --seeds 0 1 --out docs/figures/snr_by_pass_rate
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from plotting import pyplot

from lrkd.callbacks.diagnostics import pass_rate_bucket_snr
from lrkd.callbacks.pacing import PassRatePacing
from lrkd.data.datamodule import DistillDataModule
from lrkd.data.paced_settings import Pacing, Rollouts, TeacherResponses, Validation
from lrkd.data.pacing import bucket_labels, bucketize
from lrkd.data.tokens import prompt_response_example, response_token_ids
from lrkd.losses import chunked_cross_entropy
from lrkd.models.lowrank import LowRankCloneBuilder
from lrkd.models.students import model_logits
from lrkd.models.teachers import load_teacher, load_tokenizer
from lrkd.module import DistillationModule
from lrkd.objective import Loss, next_token_targets

SETUPS = ("lrc", "self")


def build(setup: str, teacher: torch.nn.Module, args: argparse.Namespace) -> DistillationModule:
    if setup == "lrc":
        student = LowRankCloneBuilder(hidden_size=args.hidden_size, init="activation_pca",
                                      probe_tokens=4096, clone_loss="relative_mse",
                                      seed=0)  # fmt: skip
        return DistillationModule(
            teacher, student, teacher_dtype="float32", loss=Loss(clone_weight=0.2)
        )
    student = copy.deepcopy(teacher).requires_grad_(True)  # a trainable copy of the teacher
    return DistillationModule(teacher, student, teacher_dtype="float32")


def measure(setup: str, teacher: torch.nn.Module, tokenizer, args: argparse.Namespace) -> dict:
    module = build(setup, teacher, args)
    dm = DistillDataModule(
        tokenizer="smollm2-135m-instruct", num_problems=args.problems,
        difficulties=args.difficulties, val_fraction=0.0,
        chat_template=False, prompt_template="Question: {prompt}\nAnswer:",
        teacher_responses=TeacherResponses(max_new_tokens=32),
        rollouts=Rollouts(num_samples=args.rollouts, max_new_tokens=24, batch_size=48),
        pacing=Pacing(estimate_at_start=False), validation=Validation(num_samples=0),
        seq_length=96,
    )  # fmt: skip
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    pacing = PassRatePacing(dm)
    dm.trainer = trainer
    trainer.strategy.connect(module)
    dm.setup()
    pacing.prepare_responses(trainer, module)
    start = time.perf_counter()
    p = pacing.estimate(trainer, module)
    estimate_s = time.perf_counter() - start
    labels = bucket_labels(dm.bucket_edges)
    sizes = torch.bincount(bucketize(p, dm.bucket_edges), minlength=len(labels)).tolist()

    module.train()
    # Weights generated in the autograd graph, so that gradients reach the clone's projections.
    module.student.cache_weights = False
    params = [q for q in module.student.parameters() if q.requires_grad]
    if setup == "lrc":
        examples = None  # the DataModule's: the teacher's greedy responses

        def loss(batch):
            return module.distillation_loss(batch)["loss"]
    else:
        examples = [
            prompt_response_example(prompts, response_token_ids(tokenizer, f" {q.answer}"))
            for prompts, q in zip(dm.prompts("train"), dm.train_problems, strict=True)
        ]

        def loss(batch):
            targets, mask = next_token_targets(batch)
            logits = model_logits(module.student, batch["input_ids"], batch["attention_mask"])
            return chunked_cross_entropy(logits, targets, mask, reduction="mean")

    runs = []
    start = time.perf_counter()
    for seed in args.seeds:
        results = pass_rate_bucket_snr(dm, loss, params, args.per_bucket, seed, examples)
        runs.append({label: vars(r) for label, r in results.items()})
        summary = ", ".join(f"{k} {v.snr_debiased:.3f} (n={v.count})" for k, v in results.items())
        print(f"  {setup} seed {seed}: {summary}", flush=True)
    return {
        "setup": setup, "labels": labels, "bucket_sizes": sizes, "mean_pass_rate": float(p.mean()),
        "estimate_seconds": estimate_s, "snr_seconds": time.perf_counter() - start,
        "trainable": sum(q.numel() for q in params), "runs": runs,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--problems", type=int, default=240)
    parser.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--per-bucket", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--hidden-size", type=int, default=504)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/snr_by_pass_rate"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    teacher = load_teacher("smollm2-135m-instruct", dtype=torch.float32)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    results = [measure(setup, teacher, tokenizer, args) for setup in args.setups]

    print(f"\n{args.problems} built-in problems (difficulties {args.difficulties}), "
          f"K = {args.rollouts}, up to {args.per_bucket} problems per bucket, "
          f"seeds {args.seeds}")  # fmt: skip
    print("Debiased gradient SNR per bucket (one value per seed; n = problems used)\n")
    labels = results[0]["labels"]
    print("| setup | mean p | " + " | ".join(labels) + " |")
    print("|---|---:|" + "---|" * len(labels))
    for r in results:
        cells = []
        for j, label in enumerate(labels):
            values = [run[label]["snr_debiased"] for run in r["runs"] if label in run]
            n = r["runs"][0][label]["count"] if label in r["runs"][0] else 0
            text = " / ".join(f"{v:.3f}" for v in values) if values else "–"
            cells.append(f"{text} (n={n} of {r['bucket_sizes'][j]})")
        print(f"| {r['setup']} | {r['mean_pass_rate']:.3f} | " + " | ".join(cells) + " |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out_json = args.out.with_suffix(".json")
    out_json.write_text(json.dumps({"config": config, "results": results}, indent=1))
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        for k, run in enumerate(r["runs"]):
            xs = [j for j, label in enumerate(labels) if label in run]
            ax.plot(xs, [run[labels[j]]["snr_debiased"] for j in xs], marker="o",
                    label=f"seed {args.seeds[k]}")  # fmt: skip
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30)
        ax.set_xlabel("student pass-rate bucket")
        ax.set_ylabel("gradient SNR (debiased)")
        ax.set_title(f"{r['setup']}: mean p = {r['mean_pass_rate']:.2f}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.png')} and {out_json}")


if __name__ == "__main__":
    main()
