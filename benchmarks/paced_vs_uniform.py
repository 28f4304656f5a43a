"""PACED vs uniform vs hard-filter weighting, and forward vs reverse vs two-stage KL, at equal
training steps.

Same teacher (the built-in SmolLM2-135M-Instruct), same student (a Low-Rank Clone, by default
504 wide with the activation-PCA init, so that it starts with some arithmetic competence), same
built-in problems, same teacher responses (greedy, generated once and cached), same seed, same
number of optimizer steps and batch size. Arms differ only in ``data.weighting``:

- ``paced``: each problem's divergence weighted by ``w(p) = p (1 - p)`` (normalised to mean 1
  over the problems drawn; zero-weight problems skipped);
- ``uniform``: plain forward-KL distillation (no estimation);
- ``hard_filter``: weight 1 for problems with 0 < p < 1, none for the rest.

``--schedules`` adds the KL schedule as a second axis (issue 5):

- ``forward_kl``: forward KL on the teacher's responses throughout (the default);
- ``reverse_kl``: reverse KL on the student's own completions (one per prompt, temperature 1,
  ``--on-policy-tokens`` new tokens) on every step;
- ``two_stage``: forward KL, then on-policy reverse KL from ``--switch-fraction`` of the steps
  (:class:`lrkd.callbacks.two_stage.TwoStageKL`).

Every run has the same optimizer steps, batch size, estimation rounds and data; on-policy steps
additionally pay for sampling, which the time column shows.

p is re-estimated every ``--estimate-every`` steps from ``--rollouts`` samples per problem.
Reported: the student's greedy pass@1 on the held-out problems before training and after, per
arm, with its binomial standard error, the teacher's pass@1, and the wall time of each arm.

    python benchmarks/paced_vs_uniform.py --steps 120 --out docs/figures/paced_vs_uniform
    python benchmarks/paced_vs_uniform.py --arms paced --schedules forward_kl reverse_kl two_stage
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from lrkd.callbacks.pacing import PassRatePacing
from lrkd.callbacks.two_stage import TwoStageKL
from lrkd.data.datamodule import DistillDataModule
from lrkd.data.paced_settings import Pacing, Rollouts, TeacherResponses, Validation
from lrkd.generation.on_policy import OnPolicy
from lrkd.models.lowrank import LowRankCloneBuilder
from lrkd.models.teachers import load_teacher
from lrkd.module import DistillationModule
from lrkd.objective import Loss

ARMS = ("paced", "uniform", "hard_filter")
SCHEDULES = ("forward_kl", "reverse_kl", "two_stage")


def run_arm(arm: str, schedule: str, teacher: torch.nn.Module, args: argparse.Namespace) -> dict:
    """Train one arm from the same initial student; return held-out pass@1 before and after."""
    torch.manual_seed(args.seed)
    student = LowRankCloneBuilder(
        hidden_size=args.hidden_size, init="activation_pca", probe_tokens=4096,
        clone_loss="relative_mse", seed=args.seed,
    )  # fmt: skip
    module = DistillationModule(
        teacher,
        student,
        teacher_dtype="float32",
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
        loss=Loss(
            clone_weight=args.clone_weight,
            divergence="reverse_kl" if schedule == "reverse_kl" else "forward_kl",
        ),
        on_policy=OnPolicy(
            fraction=1.0 if schedule == "reverse_kl" else 0.0, max_new_tokens=args.on_policy_tokens
        ),
    )
    estimating = arm != "uniform"
    datamodule = DistillDataModule(
        tokenizer="smollm2-135m-instruct",
        num_problems=args.problems,
        difficulties=args.difficulties,
        val_fraction=args.val_fraction,
        chat_template=False,
        prompt_template="Question: {prompt}\nAnswer:",
        teacher_responses=TeacherResponses(max_new_tokens=32),
        rollouts=Rollouts(num_samples=args.rollouts, max_new_tokens=24, batch_size=48),
        pacing=Pacing(
            weighting=arm,
            estimate_at_start=estimating,
            estimate_every_n_steps=args.estimate_every if estimating else None,
            estimate_every_n_epochs=None,
        ),
        validation=Validation(num_samples=0),
        batch_size=args.batch_size,
        seq_length=96,
        seed=args.seed,
    )
    pacing = PassRatePacing(datamodule)
    trainer = Trainer(
        accelerator="cpu", max_steps=args.steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[pacing, TwoStageKL(switch_fraction=args.switch_fraction)]
        if schedule == "two_stage" else [pacing],
    )  # fmt: skip
    start = time.perf_counter()
    datamodule.trainer = trainer  # evaluate() before fit needs the trainer's strategy
    trainer.strategy.connect(module)
    datamodule.setup()
    pacing.prepare_responses(trainer, module)
    before = pacing.evaluate(trainer, module)["val/pass@1"]
    trainer.fit(module, datamodule=datamodule)
    after = pacing.evaluate(trainer, module)["val/pass@1"]
    n_val = min(len(datamodule.val_problems), datamodule.validation.max_problems or 10**9)
    p = datamodule.correct
    return {
        "arm": arm,
        "schedule": schedule,
        "pass@1_before": before,
        "pass@1_after": after,
        "stderr_after": math.sqrt(max(after * (1 - after), 1e-12) / n_val),
        "n_val": n_val,
        "teacher_pass@1": pacing.teacher_pass_at_1,
        "estimation_rounds": datamodule.rounds,
        "last_mean_pass_rate": None if p is None else float(p.double().mean() / args.rollouts),
        "last_cold_start": datamodule.cold_started,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--schedules", nargs="+", default=["forward_kl"], choices=SCHEDULES)
    parser.add_argument("--switch-fraction", type=float, default=0.5)
    parser.add_argument("--on-policy-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--problems", type=int, default=480)
    parser.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--estimate-every", type=int, default=60)
    parser.add_argument("--hidden-size", type=int, default=504)
    parser.add_argument("--clone-weight", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/paced_vs_uniform"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from lrkd.models.teachers import load_tokenizer

    teacher = load_teacher("smollm2-135m-instruct", dtype=torch.float32)
    args.tokenizer = load_tokenizer("smollm2-135m-instruct")
    results = []
    for schedule in args.schedules:
        for arm in args.arms:
            results.append(run_arm(arm, schedule, teacher, args))
            print(json.dumps(results[-1]), flush=True)

    print()
    print(
        f"{args.steps} steps x batch {args.batch_size}, LRC hidden {args.hidden_size}, "
        f"K={args.rollouts}, re-estimated every {args.estimate_every} steps, seed {args.seed}"
    )
    print(f"teacher pass@1 on the held-out problems: {results[0]['teacher_pass@1']:.3f}")
    print(
        "| weighting | schedule | pass@1 before | pass@1 after (± s.e.) | last mean p | time (s) |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        mean_p = "-" if r["last_mean_pass_rate"] is None else f"{r['last_mean_pass_rate']:.3f}"
        print(f"| {r['arm']} | {r['schedule']} | {r['pass@1_before']:.3f} | "
              f"{r['pass@1_after']:.3f} ± {r['stderr_after']:.3f} | {mean_p} | "
              f"{r['seconds']:.0f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("tokenizer", "out")}
    args.out.with_suffix(".json").write_text(
        json.dumps({"config": config, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
