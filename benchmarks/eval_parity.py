"""One model, one task, three ways: ``lrkd eval``, LMEvalCallback and lrkd's own pass@1.

The built-in teacher (or ``--model``) is scored on the first ``--limit`` items of a built-in
problem task (``lrkd_arithmetic`` by default)

1. by ``lrkd eval`` (lm-evaluation-harness on the model directory),
2. by :class:`~lrkd.callbacks.lm_eval.LMEvalCallback` with ``teacher: true`` at the start of an
   ``lrkd fit`` whose teacher is that model (fp32, one step; its time per call is reported), and
3. by lrkd's pass@1 (:func:`lrkd.generation.pass_rates.count_correct`, greedy, the task's
   ``max_gen_toks`` and stop strings, prompts formatted as DistillDataModule formats them),

and prints the three scores, and on how many items lrkd's pass@1 and lm-eval disagree.

    python benchmarks/eval_parity.py --limit 50
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lrkd.callbacks.lm_eval import LMEvalCallback
from lrkd.cli import main as lrkd_main
from lrkd.data.tokens import prompt_token_ids
from lrkd.data.verifiers import FinalNumber
from lrkd.evaluation.builtin import MAX_GEN_TOKS, STOP
from lrkd.evaluation.harness import task_manager
from lrkd.generation.pass_rates import count_correct
from lrkd.models.teachers import load_teacher, load_tokenizer, resolve_model_path


def by_cli(model: str, task: str, limit: int, out: Path) -> tuple[float, list[dict[str, Any]]]:
    """Score through ``lrkd eval``; also the per-item samples (from a direct call with
    ``log_samples``)."""
    found = lrkd_main(["eval", "--model", model, "--tasks", f"[{task}]", "--limit", str(limit),
                       "--dtype", "float32", "--output_path", str(out), "--log_samples", "true",
                       "--device", "cpu"])  # fmt: skip
    assert isinstance(found, dict)
    (name,) = found
    samples = json.loads((out / f"{name}.json").read_text())["samples"][task]
    return found[name][f"{task}/acc"], samples


def by_callback(model: str, task: str, limit: int, root: Path) -> tuple[float, float]:
    """Score through LMEvalCallback(teacher=True) at the start of a one-step fit; returns the
    teacher's score and the seconds of that call (student and teacher)."""
    config = {
        "seed_everything": 0,
        "model": {
            "teacher": model,
            "teacher_dtype": "float32",
            "student": {
                "class_path": "lrkd.models.students.FromTeacherConfig",
                "init_args": {"hidden_size": 64, "num_hidden_layers": 2, "seed": 0},
            },
        },
        "data": {
            "class_path": "lrkd.data.text.TextDataModule",
            "init_args": {"seq_length": 32, "batch_size": 2, "builtin_documents": 40},
        },
        "trainer": {
            "max_steps": 1, "limit_val_batches": 0, "precision": "32-true",
            "default_root_dir": str(root), "logger": False, "enable_checkpointing": False,
            "callbacks": [{
                "class_path": "lrkd.callbacks.lm_eval.LMEvalCallback",
                "init_args": {"tasks": [task], "limit": limit, "at_fit_start": True,
                              "at_fit_end": False, "teacher": True},
            }],
        },
    }  # fmt: skip
    cli = lrkd_main(["fit", "--config", json.dumps(config)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LMEvalCallback)]
    (row,) = callback.history
    return row[f"eval/{task}/acc_teacher"], row["eval/seconds"]


def by_lrkd(model: str, docs: list[dict[str, Any]]) -> list[bool]:
    """lrkd's greedy pass@1 on the same items (per item)."""
    path = resolve_model_path(model, field="--model")
    teacher, tokenizer = load_teacher(path, dtype=torch.float32), load_tokenizer(path)
    correct = count_correct(
        teacher, [prompt_token_ids(tokenizer, d["prompt"]) for d in docs],
        [d["answer"] for d in docs], [d["id"] for d in docs], FinalNumber(), tokenizer,
        num_samples=1, temperature=0.0, max_new_tokens=MAX_GEN_TOKS, batch_size=8,
        stop=list(STOP),
    )  # fmt: skip
    return [bool(c) for c in correct]


def task_docs(task: str, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` items of a built-in task, as lm-eval reads them."""
    manager = task_manager()
    loaded = manager.load([task])["tasks"]
    (task_object,) = loaded.values()
    return [dict(d) for d in task_object.test_docs()][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="lrkd_arithmetic")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cli_score, samples = by_cli(args.model, args.task, args.limit, Path(tmp) / "eval")
        cli_seconds = time.perf_counter() - start
        callback_score, callback_seconds = by_callback(args.model, args.task, args.limit, Path(tmp))
    docs = task_docs(args.task, args.limit)
    lrkd_items = by_lrkd(args.model, docs)
    lm_eval_items = {int(s["doc_id"]): float(s["acc"]) == 1.0 for s in samples}
    differ = sum(lm_eval_items[i] != ok for i, ok in enumerate(lrkd_items))
    result = {
        "model": args.model, "task": args.task, "items": len(docs),
        "lrkd_eval": cli_score, "callback": callback_score,
        "lrkd_pass_at_1": sum(lrkd_items) / len(lrkd_items), "items_that_differ": differ,
        "lrkd_eval_seconds": round(cli_seconds, 1),
        "callback_seconds_per_call": round(callback_seconds, 1),
    }  # fmt: skip
    print("| way | score |\n|---|---:|")
    print(f"| lrkd eval | {cli_score:.4f} |\n| LMEvalCallback | {callback_score:.4f} |")
    print(f"| lrkd pass@1 | {result['lrkd_pass_at_1']:.4f} |")
    print(f"items: {len(docs)}, on which lrkd pass@1 and lm-eval differ: {differ}; "
          f"lrkd eval {cli_seconds:.0f} s (with loading), callback call {callback_seconds:.0f} s "
          "(student and teacher)")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
