"""PACED self-distillation on the built-in model: unweighted reverse KL vs hard filter vs PACED
vs the two-stage schedule, at equal training steps and equal rollout budget.

The student is a trainable copy of SmolLM2-135M-Instruct answering the built-in arithmetic
problems zero-shot (``Question: ...\\nAnswer:``); the frozen teacher is the same model given
privileged context in its prompt (``data.teacher_prompt_template``, chosen by
``--teacher-context``): by default three worked examples and the reference answer, as in
``configs/paced/self_distill_paced.yaml``. Arms (same seed, data, steps, batch, optimizer):

- ``uniform``: on-policy reverse KL on every problem, unweighted;
- ``hard_filter``: the same, only on problems with 0 < p < 1 (weight 1);
- ``paced``: the same, each problem weighted by w(p) = p (1 - p);
- ``two_stage``: forward KL on the privileged teacher's greedy responses, then on-policy
  reverse KL from ``--switch-fraction`` of the steps, PACED-weighted.

Every arm estimates pass rates at the start and every ``--estimate-every`` steps with
``--rollouts`` samples per problem (the uniform arm ignores them), so all spend the same
rollout budget. Scored on held-out problems before and after training: greedy pass@1 and the
mean pass rate over ``--eval-samples`` samples at ``--temperature`` (which is also that of the
rollouts and of the on-policy completions). Forgetting: the student's next-token loss on
held-out general text (the built-in corpus), before and after.

    python benchmarks/paced_self_distill.py --steps 20 --estimate-every 10 --seeds 0 1 2 \
        --out docs/figures/paced_self_distill
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from plotting import pyplot

from lrkd.callbacks.pacing import PassRatePacing
from lrkd.callbacks.two_stage import TwoStageKL
from lrkd.data.datamodule import DistillDataModule
from lrkd.data.paced_settings import Pacing, Rollouts, TeacherResponses, Validation
from lrkd.data.text import TextDataModule
from lrkd.generation.on_policy import OnPolicy
from lrkd.losses import chunked_cross_entropy
from lrkd.models.students import TeacherCopy, model_logits
from lrkd.models.teachers import load_teacher, load_tokenizer
from lrkd.module import DistillationModule
from lrkd.objective import Loss, next_token_targets

ARMS = ("uniform", "hard_filter", "paced", "two_stage")
STUDENT_PROMPT = "Question: {prompt}\nAnswer:"
# Worked examples in the student's own answer format ("a op b = c"), each ended by SmolLM2's
# end-of-turn token so that the teacher stops after its answer line as well.
_EXAMPLES = (
    ("What is 7 + 5?", "12", "7 + 5 = 12"),
    ("Tom has 9 pens and gives 4 to a friend. How many pens does Tom have left?", "5", "9 - 4 = 5"),
    ("What is 6 * 3?", "18", "6 * 3 = 18"),
)


def _worked_examples(with_answer: bool) -> str:
    hint = "(The correct answer is {}.)\n"
    return "".join(
        f"Question: {q}\n{hint.format(a) if with_answer else ''}Answer: {w}<|im_end|>\n"
        for q, a, w in _EXAMPLES
    )


ANSWER_PROMPT = "Question: {prompt}\n(The correct answer is {answer}.)\nAnswer:"
# The teacher's privileged context (``data.teacher_prompt_template``), by --teacher-context.
TEACHER_PROMPTS = {
    "answer": ANSWER_PROMPT,
    "examples": _worked_examples(False) + STUDENT_PROMPT,
    "examples+answer": _worked_examples(True) + ANSWER_PROMPT,
}


@torch.no_grad()
def text_loss(student: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-mean next-token cross-entropy of ``student`` on held-out text."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    for batch in batches:
        targets, mask = next_token_targets(batch)
        logits = model_logits(student, batch["input_ids"], batch["attention_mask"])
        total += float(chunked_cross_entropy(logits, targets, mask, reduction="sum"))
        count += int(mask.sum())
    student.train(was_training)
    return total / count


def run_arm(arm: str, seed: int, teacher: torch.nn.Module, text: list, args) -> dict:
    """Train one arm from the built-in model; held-out scores and text loss before and after."""
    torch.manual_seed(seed)
    on_policy = arm != "two_stage"
    module = DistillationModule(
        teacher,
        TeacherCopy(),
        teacher_dtype="float32",
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
        loss=Loss(divergence="reverse_kl" if on_policy else "forward_kl"),
        on_policy=OnPolicy(
            fraction=1.0 if on_policy else 0.0,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=seed,
        ),
    )
    datamodule = DistillDataModule(
        tokenizer="smollm2-135m-instruct", num_problems=args.problems,
        difficulties=args.difficulties,
        val_fraction=args.val_fraction, chat_template=False, prompt_template=STUDENT_PROMPT,
        teacher_prompt_template=TEACHER_PROMPTS[args.teacher_context],
        teacher_responses=TeacherResponses(source="generate", max_new_tokens=args.max_new_tokens),
        rollouts=Rollouts(num_samples=args.rollouts, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, batch_size=48),
        pacing=Pacing(
            weighting=arm if arm in ("uniform", "hard_filter") else "paced",
            estimate_at_start=True, estimate_every_n_steps=args.estimate_every,
            estimate_every_n_epochs=None,
        ),
        validation=Validation(num_samples=args.eval_samples),
        batch_size=args.batch_size, seq_length=96, seed=seed,
    )  # fmt: skip
    pacing = PassRatePacing(datamodule)
    callbacks = [pacing]
    if arm == "two_stage":
        callbacks.append(TwoStageKL(switch_fraction=args.switch_fraction))
    trainer = Trainer(
        accelerator="cpu", max_steps=args.steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    datamodule.trainer = trainer
    trainer.strategy.connect(module)
    datamodule.setup()
    pacing.prepare_responses(trainer, module)
    before = pacing.evaluate(trainer, module)
    loss_before = text_loss(module.student, text)
    trainer.fit(module, datamodule=datamodule)
    after = pacing.evaluate(trainer, module)
    loss_after = text_loss(module.student, text)
    n_val = len(datamodule.val_problems)
    return {
        "arm": arm, "seed": seed, "n_val": n_val,
        "pass@1_before": before["val/pass@1"], "pass@1_after": after["val/pass@1"],
        "pass_rate_before": before.get("val/pass_rate"),
        "pass_rate_after": after.get("val/pass_rate"),
        "teacher_pass@1": pacing.teacher_pass_at_1,
        "text_loss_before": loss_before, "text_loss_after": loss_after,
        "estimation_rounds": datamodule.rounds,
        "last_mean_pass_rate": float(datamodule.correct.double().mean() / args.rollouts),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def _mean_spread(values: list[float], sign: bool = False) -> str:
    fmt = "+.3f" if sign else ".3f"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--problems", type=int, default=160)
    parser.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--val-fraction", type=float, default=0.3)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--estimate-every", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="of the on-policy completions, the rollouts and the eval samples",
    )
    parser.add_argument(
        "--teacher-context", choices=sorted(TEACHER_PROMPTS), default="examples+answer"
    )
    parser.add_argument("--switch-fraction", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--text-batches", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/paced_self_distill"))
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="print the table and plot of a saved JSON (no training)",
    )
    args = parser.parse_args()
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        report(saved["config"], saved["results"], args.report)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    teacher = load_teacher("smollm2-135m-instruct", dtype=torch.float32)
    args.tokenizer = load_tokenizer("smollm2-135m-instruct")
    text_data = TextDataModule(tokenizer="smollm2-135m-instruct", seq_length=128, batch_size=4,
                               builtin_documents=400, val_fraction=0.1)  # fmt: skip
    text_data.setup("fit")
    val_iter = iter(text_data.val_dataloader())
    text = [next(val_iter) for _ in range(args.text_batches)]

    results = []
    for seed in args.seeds:
        for arm in args.arms:
            results.append(run_arm(arm, seed, teacher, text, args))
            print(json.dumps(results[-1]), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("tokenizer", "report")}  # fmt: skip
    args.out.with_suffix(".json").write_text(
        json.dumps({"config": config, "results": results}, indent=1)
    )
    report(config, results, args.out)


def report(config: dict, results: list[dict], out: Path) -> None:
    """Print the results table (mean ± spread over seeds) and plot the changes to ``out``.png."""
    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in results)]
    seeds = sorted({r["seed"] for r in results})
    n_val = results[0]["n_val"]
    print(f"\n{config['steps']} steps x batch {config['batch_size']}, K = {config['rollouts']} "
          f"rollouts per problem every {config['estimate_every']} steps, {n_val} held-out "
          f"problems, seeds {seeds}")  # fmt: skip
    print(f"teacher context {config.get('teacher_context')!r}, temperature "
          f"{config.get('temperature')}, lr {config['lr']}; teacher pass@1 with its context: "
          f"{statistics.mean(r['teacher_pass@1'] for r in results):.3f}")  # fmt: skip
    print("| arm | pass@1 before | pass@1 after | pass@1 change | pass rate before | "
          "pass rate after | pass rate change | text loss change | time (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]

        def col(key: str, rows: list[dict] = rows) -> str:
            return _mean_spread([r[key] for r in rows])

        def change(key: str, rows: list[dict] = rows) -> str:
            return _mean_spread([r[f"{key}_after"] - r[f"{key}_before"] for r in rows], sign=True)

        seconds = statistics.mean(r["seconds"] for r in rows)
        print(f"| {arm} | {col('pass@1_before')} | {col('pass@1_after')} | {change('pass@1')} | "
              f"{col('pass_rate_before')} | {col('pass_rate_after')} | {change('pass_rate')} | "
              f"{change('text_loss')} | {seconds:.0f} |")  # fmt: skip
    se = math.sqrt(0.25 / n_val)
    print(f"(± is the standard deviation over seeds, each seed with its own split of the "
          f"problems; a pass@1 on {n_val} problems has a binomial standard error of at most "
          f"{se:.3f})")  # fmt: skip

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("pass@1", "held-out greedy pass@1"), ("pass_rate", "held-out mean pass rate"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, arm in enumerate(arms):
            gains = [r[f"{key}_after"] - r[f"{key}_before"] for r in results if r["arm"] == arm]
            ax.scatter([i] * len(gains), gains, color="C0", zorder=3)
            ax.bar(i, statistics.mean(gains), color="C0", alpha=0.4)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms)
        ax.set_ylabel(f"change in {label}")
    fig.suptitle(f"Self-distillation of SmolLM2-135M-Instruct, {config['steps']} steps; "
                 f"bars: mean over seeds {seeds}, points: one seed each")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
