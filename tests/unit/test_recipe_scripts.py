"""The smollm2_half recipe's shell scripts refuse what they cannot run before they start a stage:
an unknown ablation, no ablation at all, ``STAGE1=skip`` without a stage-1 student. A
``lrkd`` stand-in on ``PATH`` records the commands ``run.sh`` would run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lrkd.evaluation.command import SavedResults

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "smollm2_half"


def _bash(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(RECIPE / script)], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})  # fmt: skip


def _fake_lrkd(tmp_path: Path) -> tuple[Path, Path]:
    """A ``bin/lrkd`` that appends its arguments to ``calls.txt`` and succeeds."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "lrkd").write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    (bin_dir / "lrkd").chmod(0o755)
    return bin_dir, calls


def test_ablations_refuse_no_name_and_an_unknown_name(tmp_path) -> None:
    done = _bash("ablations.sh", tmp_path)
    assert done.returncode == 2 and "no_clone_loss" in done.stderr
    done = subprocess.run(["bash", str(RECIPE / "ablations.sh"), "uniform", "no_such"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "unknown ablation 'no_such'" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran, not even the valid one


def test_stage1_skip_needs_a_stage1_student(tmp_path) -> None:
    bin_dir, calls = _fake_lrkd(tmp_path)
    path = f"{bin_dir}:{os.environ['PATH']}"
    done = _bash("run.sh", tmp_path, STAGE1="skip", PATH=path)
    assert done.returncode == 2 and "needs runs/smollm2_half_clone/student" in done.stderr
    assert not calls.exists()


def test_run_passes_each_stage_its_own_arguments(tmp_path) -> None:
    bin_dir, calls = _fake_lrkd(tmp_path)
    path = f"{bin_dir}:{os.environ['PATH']}"
    done = _bash("run.sh", tmp_path, PATH=path, STAGE1_ARGS="--model.loss.clone_weight 0",
                 STAGE2_ARGS="--data.pacing.weighting uniform", STAGE2="two_stage",
                 COMPARE="none")  # fmt: skip
    assert done.returncode == 0, done.stderr
    fit1, fit2, evaluate = calls.read_text().splitlines()
    assert fit1 == f"fit --config {RECIPE}/clone.yaml --model.loss.clone_weight 0"
    assert fit2 == f"fit --config {RECIPE}/two_stage.yaml --data.pacing.weighting uniform"
    assert evaluate.startswith("eval --model runs/smollm2_half_paced/student --tasks ")
    assert "--compare" not in evaluate

    calls.unlink()
    done = _bash("run.sh", tmp_path, PATH=path, STAGE1="skip")
    assert done.returncode == 2  # (no stage-1 student here: refused, nothing run)
    (tmp_path / "runs" / "smollm2_half_clone" / "student").mkdir(parents=True)
    (tmp_path / "runs" / "smollm2_half_clone" / "student" / "config.json").write_text("{}")
    done = _bash("run.sh", tmp_path, PATH=path, STAGE1="skip")
    assert done.returncode == 0, done.stderr
    fit2, evaluate = calls.read_text().splitlines()
    # By default the teacher's scores are read from the saved results beside the script.
    assert evaluate.endswith(f"--compare {RECIPE}/smollm2-135m-instruct.json --tasks "
                             "lrkd_arithmetic,lrkd_corpus,lrkd_pydoc --output_path "
                             "runs/smollm2_half_eval")  # fmt: skip

    calls.unlink()  # SEED reaches every seed of each stage
    done = _bash("run.sh", tmp_path, PATH=path, STAGE1="skip", SEED="2")
    assert done.returncode == 0, done.stderr
    seeds = "--seed_everything 2 --data.init_args.seed 2"
    assert calls.read_text().splitlines()[0] == (
        f"fit --config {RECIPE}/paced.yaml {seeds} --model.on_policy.seed 2"
    )
    calls.unlink()
    done = _bash("run.sh", tmp_path, PATH=path, STOP_AFTER="1", SEED="2")
    assert calls.read_text().splitlines() == [
        f"fit --config {RECIPE}/clone.yaml {seeds} --model.student.init_args.seed 2"
    ]

    calls.unlink()
    done = _bash("run.sh", tmp_path, PATH=path, STOP_AFTER="1")
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == [f"fit --config {RECIPE}/clone.yaml"]


def test_the_saved_teacher_scores_cover_stage_3() -> None:
    """The teacher's saved results that stage 3 reads are lm-eval's, for stage 3's tasks on all
    items (``lrkd eval`` checks versions and item counts against the student's when it runs)."""
    saved = SavedResults.read(str(RECIPE / "smollm2-135m-instruct.json"))
    saved.check(["lrkd_arithmetic", "lrkd_corpus", "lrkd_pydoc"], limit=None)
    counts = {task: n["effective"] for task, n in saved.results["n-samples"].items()}
    assert counts == {"lrkd_arithmetic": 250, "lrkd_corpus": 200, "lrkd_pydoc": 79}
    assert saved.results["results"]["lrkd_arithmetic"]["acc,none"] == 0.156
