"""Report a run of the smollm2_half recipe (``configs/recipes/smollm2_half/run.sh``): the held-out
metrics over both stages from their TensorBoard logs, the final ``lrkd eval`` scores of the
student and the teacher, and the student's size against the teacher's.

Prints a markdown table, writes ``OUT.json`` and (with matplotlib) ``OUT.png``::

    python benchmarks/recipe_report.py --runs runs --out docs/figures/smollm2_half

Panels of the plot: held-out bits per byte on ``lrkd_corpus`` and on ``lrkd_pydoc``
(``LMEvalCallback``'s documents) of the student and the teacher over both stages, with the final
``lrkd eval`` scores on all documents; the student's greedy pass@1 on the stage-2 validation
problems (``val/pass@1``) with the teacher's, and the final ``lrkd eval`` scores on all 250
``lrkd_arithmetic`` items.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plotting import pyplot

STAGES = ("smollm2_half_clone", "smollm2_half_paced")
TEXT = {task: f"eval/{task}/bits_per_byte" for task in ("lrkd_corpus", "lrkd_pydoc")}
TAGS = (*TEXT.values(), *(f"{tag}_teacher" for tag in TEXT.values()), "val/ce", "val/pass@1",
        "val/pass@1_teacher")  # fmt: skip


def scalars(run_dir: Path, tags: tuple[str, ...] = TAGS) -> dict[str, list[tuple[int, float]]]:
    """The scalars with these tags in the newest ``version_*`` of a TensorBoard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(run_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"{run_dir}: no TensorBoard version_* folder; run the recipe")
    acc = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    found = set(acc.Tags()["scalars"])
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in found}


def non_embedding_parameters(model_dir: str) -> tuple[int, int]:
    """(non-embedding parameters, all parameters) of a Hugging Face model directory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() != table.weight.data_ptr():
        embedding += head.weight.numel()
    return total - embedding, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="the recipe's save_dir")
    parser.add_argument("--eval", help="lrkd eval's --output_path (RUNS/smollm2_half_eval)")
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="smollm2_half_report")
    args = parser.parse_args()
    runs = Path(args.runs)
    curves = {stage: scalars(runs / stage) for stage in STAGES}
    scores_path = Path(args.eval or runs / "smollm2_half_eval") / "scores.json"
    scores: dict[str, dict[str, float]] = json.loads(scores_path.read_text())

    from lrkd.models.teachers import resolve_model_path

    student_dir = runs / "smollm2_half_paced" / "student"
    sizes = {"student": non_embedding_parameters(str(student_dir)),
             "teacher": non_embedding_parameters(resolve_model_path(args.teacher))}  # fmt: skip
    report: dict[str, Any] = {"curves": curves, "scores": scores, "parameters": sizes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")

    names = list(scores)
    student, teacher = scores[names[0]], scores[names[-1]] if len(names) > 1 else {}
    ours, theirs = sizes["student"][0], sizes["teacher"][0]
    print(f"non-embedding parameters: student {ours / 1e6:.1f}M, teacher {theirs / 1e6:.1f}M "
          f"(ratio {ours / theirs:.3f})")  # fmt: skip
    print("\n| metric | student | teacher | student / teacher |\n|---|---:|---:|---:|")
    for key in sorted(student):
        s, t = student[key], teacher.get(key, math.nan)
        print(f"| {key} | {s:.4f} | {t:.4f} | {s / t if t else math.nan:.3f} |")
    _plot(curves, student, teacher, args.out)


def _plot(curves: dict[str, dict[str, list[tuple[int, float]]]], student: dict[str, float],
          teacher: dict[str, float], out: str) -> None:  # fmt: skip
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (task, tag) in zip(axes, TEXT.items(), strict=False):
        offset, last = 0, None
        for stage, found in curves.items():
            points = [(offset + s, v) for s, v in found.get(tag, [])]
            if last is not None and points and points[0][0] > offset:
                points.insert(0, last)  # stage 2 starts from stage 1's last score, not rescored
            if points:
                last = points[-1]
                ax.plot(*zip(*points, strict=True), "o-", label=f"student ({stage.split('_')[-1]})")
            offset = max((s for s, _ in points), default=offset)
        # The teacher is scored once (at stage 1's start): a level line over the whole run.
        levels = [found[f"{tag}_teacher"][0][1] for found in curves.values()
                  if found.get(f"{tag}_teacher")]  # fmt: skip
        if levels:
            ax.axhline(levels[0], color="k", ls="--", label="teacher")
        for scores, marker, label in ((student, "s", "student"), (teacher, "D", "teacher")):
            if f"{task}/bits_per_byte" in scores:
                ax.plot([offset], [scores[f"{task}/bits_per_byte"]], marker,
                        label=f"{label} lrkd eval (all)")  # fmt: skip
        ax.set_xlabel("optimizer step (stage 1, then stage 2)")
        ax.set_ylabel(f"bits per byte, held-out {task}")
        ax.legend(fontsize=7)
    arith = axes[2]
    paced = curves[STAGES[1]]
    if "val/pass@1" in paced:
        arith.plot(*zip(*paced["val/pass@1"], strict=True), "o-", label="student val/pass@1")
    if "val/pass@1_teacher" in paced:
        level = paced["val/pass@1_teacher"][0][1]
        arith.axhline(level, color="k", ls="--", label="teacher val/pass@1")
    for scores, marker, label in ((student, "s", "student"), (teacher, "D", "teacher")):
        if "lrkd_arithmetic/acc" in scores:
            last = max((s for s, _ in paced.get("val/pass@1", [(0, 0)])), default=0)
            arith.plot([last], [scores["lrkd_arithmetic/acc"]], marker,
                       label=f"{label} lrkd eval (250)")  # fmt: skip
    arith.set_xlabel("stage-2 optimizer step")
    arith.set_ylabel("arithmetic pass@1")
    arith.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=120)
    print(f"wrote {out}.png")


if __name__ == "__main__":
    main()
