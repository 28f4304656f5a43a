"""benchmarks/teacher_cache.py at its --tiny setting: a tiny random teacher (vocab 128), caches
of k = 8, 32 and 128 (= V), the student trained online and from each cache in fresh processes on
the same batches, and each scored against the teacher's full distribution."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "teacher_cache.py"
KS = (8, 32, 128)


def test_every_variant_is_measured_and_the_full_cache_matches_online(tmp_path: Path) -> None:
    out = tmp_path / "teacher_cache.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    names = ["untrained student (reference)", "online (teacher in the loop, float32)"]
    names += [f"cache k={k}" for k in KS]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == names
    assert proc.stdout.startswith("command: python ")
    assert "cache k=128 | 128 (= V) |" in proc.stdout
    assert result["full_vocab"] is None  # V = 128 is one of the ks: built and trained

    runs = result["runs"]
    assert set(runs) == {"online", *(f"cache k={k}" for k in KS)}
    for run in runs.values():
        assert "error" not in run, run
        for key in ("step_ms", "compute_ms", "tokens_per_s", "fit_s", "cores_busy"):
            assert math.isfinite(run[key]) and run[key] > 0, (key, run)
        assert run["peak_rss_bytes"] > run["rss_growth_bytes"] > 0
        assert run["steps"] == 6 and all(math.isfinite(x) for x in run["losses"])
    assert len({run["data_digest"] for run in runs.values()}) == 1  # the same batches
    assert runs["online"]["teacher_dtype"] == "float32"

    caches = result["caches"]
    assert [c["k"] for c in caches] == list(KS)
    sizes = [c["bytes_per_token"] for c in caches]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    for cache in caches:  # uint16 ids + float16 log-probs, and the list offsets
        assert cache["formula_bytes_per_token"] == 4 * cache["k"] + 2
        assert 0 <= cache["bytes_per_token"] - cache["formula_bytes_per_token"] < 1
        assert cache["size_bytes"] > cache["teacher_files_bytes"] > 0
        assert math.isfinite(cache["build_s"]) and cache["build_cores_busy"] > 0

    scores = result["scores"]
    for s in scores.values():
        assert math.isfinite(s["kl"]) and s["kl"] >= 0 and math.isfinite(s["ce"])
    online = scores["online"]["kl"]
    gaps = {k: abs(scores[f"cache k={k}"]["kl"] - online) for k in KS}
    assert min(gaps, key=gaps.get) == max(KS), gaps
    assert math.isclose(scores["cache k=128"]["kl"], online, rel_tol=0.05), scores
    assert online < scores["initial"]["kl"]  # training moved the student towards the teacher
