"""benchmarks/recipe_report.py on a made-up recipe run: TensorBoard logs of both stages, an
``lrkd eval`` scores file and two tiny models; the report's curves, ratios and parameter counts
against values computed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "recipe_report.py"


def test_report_reads_both_stages_and_the_eval_scores(tmp_path, tiny_teacher_dir) -> None:
    from conftest import make_tiny_llama
    from torch.utils.tensorboard import SummaryWriter

    runs = tmp_path / "runs"
    logged = {
        "smollm2_half_clone": {"eval/lrkd_corpus/bits_per_byte": [(0, 2.0), (60, 0.7)],
                               "eval/lrkd_corpus/bits_per_byte_teacher": [(0, 1.25)]},
        "smollm2_half_paced": {"eval/lrkd_corpus/bits_per_byte": [(0, 0.7), (60, 0.8)],
                               "val/pass@1": [(29, 0.02), (59, 0.05)],
                               "val/pass@1_teacher": [(29, 0.16)]},
    }  # fmt: skip
    for stage, tags in logged.items():
        writer = SummaryWriter(runs / stage / "version_0")
        for tag, points in tags.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        writer.close()
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
