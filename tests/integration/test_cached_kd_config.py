"""configs/cached_kd.yaml as its header says to run it, on a small corpus: ``lrkd prepare
--fit_config configs/plain_kd.yaml``, ``lrkd cache-teacher`` with the built-in teacher, then
``lrkd fit --config configs/cached_kd.yaml``; the run trains from the cache, whose teacher
directory holds no weights, and its top-32 log-probs match the teacher's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrkd.cli import main
from lrkd.data.prepared import PreparedExamples
from lrkd.data.teacher_cache import read_teacher_cache
from lrkd.models.teachers import load_teacher

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_cached_kd_config_end_to_end(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the config's relative paths: data/, runs/
    main(["prepare", "--fit_config", str(CONFIGS / "plain_kd.yaml"), "--out", "data/plain_kd",
          "--builtin_documents", "300"])  # fmt: skip
    cache = main(["cache-teacher", "--prepared", "data/plain_kd", "--teacher",
                  "smollm2-135m-instruct", "--top_k", "32",
                  "--out", "data/plain_kd-top32"])  # fmt: skip
    info = read_teacher_cache(cache)
    assert (info.top_k, info.temperature, info.vocab_size) == (32, 1.0, 49152)
    # uint16 ids and fp16 log-probs: 2 * 32 + 2 * 33 = 130 bytes, plus Arrow's list offsets.
    assert 130 <= info.bytes_per_token < 135
    assert not [p for p in cache.rglob("*") if p.suffix in (".safetensors", ".bin", ".gguf")]

    example = PreparedExamples(cache / "train")[0]
    dtype = getattr(torch, info.dtype)  # the cache's: auto is bf16 on a bf16-fast CPU
    teacher = load_teacher("smollm2-135m-instruct", dtype=dtype)
    with torch.no_grad():
        logits = teacher(input_ids=example["input_ids"][None]).logits[0, :-1].float()
    values, ids = logits.log_softmax(-1).topk(32, dim=-1)
    stored = example["topk_logprobs"][:-1]
    # fp16 storage (about 1e-2 at log-probs near -10); bf16 matmuls batched differently.
    tol = 5e-2 if info.dtype == "bfloat16" else 2e-2
    torch.testing.assert_close(stored[:, :4], values[:, :4], rtol=0, atol=tol)
    agree = (example["topk_ids"][:-1, 0] == ids[:, 0]).float().mean()
    assert agree > 0.95

    cli = main(["fit", "--config", str(CONFIGS / "cached_kd.yaml"), "--trainer.max_steps", "3",
                "--trainer.limit_val_batches", "1",
                "--trainer.val_check_interval", "3"])  # fmt: skip
    assert cli.trainer.global_step == 3
    assert type(cli.model.teacher).__name__ == "CachedTeacher"
    assert (tmp_path / "runs" / "cached_kd" / "student" / "config.json").is_file()
