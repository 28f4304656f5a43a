"""benchmarks/recipe_report.py on a made-up recipe run: TensorBoard logs of both stages, an
``lrkd eval`` scores file and two tiny models; the report's curves, ratios and parameter counts
against values computed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "recipe_report.py"


def _write_scalars(run_dir: Path, tags: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir / "version_0")
    for tag, points in tags.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_report_reads_both_stages_and_the_eval_scores(tmp_path, tiny_teacher_dir) -> None:
    from conftest import make_tiny_llama

    runs = tmp_path / "runs"
    logged = {
        "smollm2_half_clone": {"eval/lrkd_corpus/bits_per_byte": [(0, 2.0), (60, 0.7)],
                               "eval/lrkd_corpus/bits_per_byte_teacher": [(0, 1.25)]},
        "smollm2_half_paced": {"eval/lrkd_corpus/bits_per_byte": [(0, 0.7), (60, 0.8)],
                               "val/pass@1": [(29, 0.02), (59, 0.05)],
                               "val/pass@1_teacher": [(29, 0.16)]},
    }  # fmt: skip
    for stage, tags in logged.items():
        _write_scalars(runs / stage, tags)
    student = make_tiny_llama(hidden_size=32, intermediate_size=64)
    student.save_pretrained(runs / "smollm2_half_paced" / "student")
    (runs / "smollm2_half_eval").mkdir()
    arithmetic, text = "lrkd_arithmetic/acc", "lrkd_corpus/bits_per_byte"
    scores = {"student": {arithmetic: 0.1, text: 0.9}, "teacher": {arithmetic: 0.2, text: 1.2}}
    (runs / "smollm2_half_eval" / "scores.json").write_text(json.dumps(scores))

    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", str(runs), "--teacher", str(tiny_teacher_dir),
         "--out", str(out)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(Path(f"{out}.json").read_text())
    for stage, tags in logged.items():
        for tag, points in tags.items():
            got = [(step, round(value, 6)) for step, value in report["curves"][stage][tag]]
            assert got == points, (stage, tag)
    assert report["scores"] == scores

    def non_embedding(model) -> int:
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        shared = head.data_ptr() == embedding.data_ptr()
        return (
            sum(p.numel() for p in model.parameters())
            - embedding.numel()
            - (0 if shared else head.numel())
        )

    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    assert report["parameters"]["student"][0] == non_embedding(student)
    assert report["parameters"]["teacher"][0] == non_embedding(teacher)
    assert "| lrkd_arithmetic/acc | 0.1000 | 0.2000 | 0.500 |" in done.stdout
    assert "| lrkd_corpus/bits_per_byte | 0.9000 | 1.2000 | 0.750 |" in done.stdout


def test_ablation_table_takes_the_last_points_and_the_spread_over_seeds(tmp_path) -> None:
    """Two seeds of a stage-1 ablation (only stage 1 ran) and one of a stage-2 ablation (no
    stage-1 log, an eval scores file): means, sample standard deviations, dashes."""
    root = tmp_path / "runs" / "ablations"
    corpus, pydoc = "eval/lrkd_corpus/bits_per_byte", "eval/lrkd_pydoc/bits_per_byte"
    for seed, (c, p) in enumerate(((0.70, 2.9), (0.80, 3.1))):
        _write_scalars(root / "no_clone_loss" / f"seed{seed}" / "runs" / "smollm2_half_clone",
                       {corpus: [(0, 2.0), (120, c)], pydoc: [(0, 4.0), (120, p)]})  # fmt: skip
    uniform = root / "uniform" / "seed0" / "runs"
    _write_scalars(uniform / "smollm2_half_paced", {"val/pass@1": [(39, 0.05), (159, 0.125)]})
    (uniform / "smollm2_half_eval").mkdir(parents=True)
    (uniform / "smollm2_half_eval" / "scores.json").write_text(
        json.dumps({"student": {"lrkd_arithmetic/acc": 0.1, "lrkd_pydoc/bits_per_byte": 2.5}})
    )
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "recipe_ablations.py"), "--ablations", str(root),
         "--recipe", "", "--out", str(tmp_path / "table")], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines()}
    # mean 0.75, sample sd of (0.70, 0.80) = 0.0707; pydoc mean 3.0, sd 0.1414
    assert rows["no_clone_loss"] == (
        "| no_clone_loss | 0,1 | 0.750 ± 0.071 (0.700-0.800) | 3.000 ± 0.141 (2.900-3.100) "
        "| - | - | - | - |"
    )
    assert rows["uniform"] == "| uniform | 0 | - | - | 0.125 | 0.100 | - | 2.500 |"
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["no_clone_loss"]["1"]["stage1:eval/lrkd_pydoc/bits_per_byte"] == pytest.approx(3.1)


def test_ablation_table_merges_the_seeds_of_an_earlier_table(tmp_path) -> None:
    """``--merge``: an earlier table's seeds join the ones found now; a seed found now wins."""
    root = tmp_path / "runs" / "ablations"
    pydoc = "eval/lrkd_pydoc/bits_per_byte"
    _write_scalars(root / "normal_init" / "seed1" / "runs" / "smollm2_half_clone",
                   {pydoc: [(0, 4.0), (120, 3.0)]})  # fmt: skip
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({
        "normal_init": {"0": {f"stage1:{pydoc}": 2.0}, "1": {f"stage1:{pydoc}": 9.0}},
        "uniform": {"0": {"eval:lrkd_arithmetic/acc": 0.25}},
    }))  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "recipe_ablations.py"), "--ablations", str(root),
         "--recipe", "", "--merge", str(earlier), "--out", str(tmp_path / "table")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines()}
    # normal_init: seed 0 from the earlier table (2.0), seed 1 from the runs (3.0, not 9.0)
    assert rows["normal_init"] == (
        "| normal_init | 0,1 | - | 2.500 ± 0.707 (2.000-3.000) | - | - | - | - |"
    )
    assert rows["uniform"] == "| uniform | 0 | - | - | - | 0.250 | - | - |"
    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["normal_init"]["1"][f"stage1:{pydoc}"] == pytest.approx(3.0)
