"""benchmarks/throughput.py: a tiny CPU smoke run of both step kinds, and its FLOPs per token
against a hand computation from the tiny config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"

# The script's --tiny shape: a tiny tied Llama teacher and a hidden-32 student, micro-batch 2.
V, D_T, D_S, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, SEQ, MICRO_BATCH = (
    512, 64, 32, 2, 4, 2, 16, 128, 64, 2,
)  # fmt: skip


def hand_flops_per_token() -> dict[str, float]:
    """Model FLOPs per token of each step kind, computed by hand from the tiny config."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM  # 64, 32

    def nonembed(d: int) -> int:  # 7 linears + 2 norm gains per layer, final norm
        return LAYERS * (d * q + 2 * d * kv + q * d + 3 * d * FFN + 2 * d) + d

    attention = 2 * LAYERS * SEQ * q  # QK^T and AV, seq/2 keys per token on average
    teacher = 2 * nonembed(D_T) + 2 * V * D_T + attention  # forward only
    student = 6 * nonembed(D_S) + 6 * V * D_S + 3 * attention  # forward + backward
    clone = LAYERS * 2 * 2 * D_T * D_S  # attn/ffn outputs mapped into student space
    # Generated: q, k, v, o, gate, up, down per layer and the (tied) embedding.
    rows = LAYERS * (q + kv + kv + q + FFN + FFN + FFN) + V
    generation = 2 * (2 * D_T * D_S * rows) / (MICRO_BATCH * SEQ)  # generate + flush
    return {
        "plain": teacher + student,
        "lrc": teacher + student + clone + generation,
        "teacher_nonembed": nonembed(D_T),
        "student_nonembed": nonembed(D_S),
    }


def test_hand_numbers() -> None:
    """The hand computation's values, worked out once on paper."""
    hand = hand_flops_per_token()
    assert hand["teacher_nonembed"] == 2 * (36_864 + 128) + 64 == 74_048
    assert hand["student_nonembed"] == 2 * (18_432 + 64) + 32 == 37_024
    # teacher 148,096 + 65,536 + 16,384; student 222,144 + 98,304 + 49,152
    assert hand["plain"] == 230_016 + 369_600 == 599_616
    # + clone targets 16,384 + generation 2 * (2 * 64 * 32 * 1,664) / 128 = 106,496
    assert hand["lrc"] == 599_616 + 16_384 + 106_496 == 722_496


def test_throughput_tiny_cpu(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--steps", "2",
           "--warmup", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| lrc | 2 x 1 | 64 |" in proc.stdout and "| plain | 2 x 1 | 64 |" in proc.stdout

    report = json.loads(out.read_text())
    rows = {row["kind"]: row for row in report["rows"]}
    assert set(rows) == {"lrc", "plain"}
    hand = hand_flops_per_token()
    for kind, row in rows.items():
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
        assert 0 < row["mfu"] <= 1
        assert row["flops_per_token"] == pytest.approx(hand[kind], rel=1e-12)
        # The script's parameter formula agrees with the real models it built.
        assert row["teacher_nonembed_counted"] == hand["teacher_nonembed"]
        assert row["student_nonembed_counted"] == hand["student_nonembed"]
        assert all(math.isfinite(loss) for loss in row["losses"])
    # cache_weights: the projections change every optimizer step, so the weights are generated
    # (and counted) once per step.
    assert rows["lrc"]["weights_generated_every_step"] is True
    # G counted on the clone's generated tensors: 2 * d_T * d_S * 1,664 rows.
    assert rows["lrc"]["generation_flops_counted"] == 2 * 64 * 32 * 1_664

    # At the default shape the teacher + student FLOPs are the 17.5 GFLOP/token.
    assert report["cross_check"]["model_gflop_per_token"] == pytest.approx(17.5, rel=0.01)


def test_trl_row_on_the_tiny_shape(tmp_path: Path) -> None:
    """``--trl``: TRL's GKDTrainer step (forward KL) on the plain tiny shape, beside lrkd's."""
    pytest.importorskip("trl", reason="trl is not installed: pip install -e '.[bench]'")
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--steps", "1",
           "--warmup", "0", "--steps-kind", "plain", "--trl", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["kind"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "trl"}
    assert "error" not in rows["trl"], rows["trl"]
    assert rows["trl"]["tokens_per_s"] > 0
    # Same teacher, student init and batch, forward KL over the same targets: the first (and
    # only, before any update) loss of TRL's step is lrkd's.
    assert rows["trl"]["losses"][0] == pytest.approx(rows["plain"]["losses"][0], rel=1e-4)
    assert "FAILED" not in proc.stdout
