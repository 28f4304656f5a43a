"""benchmarks/gpu_suite.sh: it refuses at once without CUDA or a package, runs every part in its
tiny CPU mode, keeps going past a failed or hung part, and judges GPU-mode outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
WRAPPER = ROOT / "benchmarks" / "gpu_suite.sh"


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    """benchmarks/gpu_suite.py imported as a module."""
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_wrapper(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``bash benchmarks/gpu_suite.sh ARGS`` with this interpreter as its python."""
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(WRAPPER), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)  # fmt: skip


def parts_of(out: Path) -> dict[str, dict]:
    """summary.json's parts by name."""
    return {p["name"]: p for p in json.loads((out / "summary.json").read_text())["parts"]}


# ---------------------------------------------------------------------------------- fail fast
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA is available here: the suite would run, not refuse"
)
def test_without_cuda_it_fails_at_once_with_one_line(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run_wrapper("--out", str(tmp_path / "out"), timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_suite: no CUDA device visible (torch ")
    assert "--cpu-check" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()  # nothing written, nothing started
    assert elapsed < 20, elapsed  # import torch and look: about 2 s


@pytest.mark.parametrize(
    ("attribute", "extra", "expected"),
    [
        ("REQUIRED_MODULES", "lrkd_no_such_package", "cannot import lrkd_no_such_package"),
        ("REQUIRED_FILES", "benchmarks/no_such_script.py", "lacks benchmarks/no_such_script.py"),
    ],
)
def test_a_missing_package_or_file_fails_at_once_with_one_line(
    suite, tmp_path, monkeypatch, capsys, attribute, extra, expected
) -> None:
    monkeypatch.setattr(suite, attribute, (*getattr(suite, attribute), extra))
    assert suite.main(["--cpu-check", "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_suite: ") and expected in lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- CPU runs
@pytest.mark.slow  # about 55 s on a 2-core CPU
def test_cpu_check_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_wrapper("--cpu-check", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    names = ["env", "gpu-tests", "throughput-lrc", "throughput-plain", "loss-memory",
             "fsdp2-smoke"]  # fmt: skip
    for i, name in enumerate(names, 1):
        assert f"[{i}/6] {name} ... ok (" in proc.stdout
    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout  # printed at the end
    assert "**all parts ok**" in summary
    for name in names:
        assert f"| {name} | ok |" in summary
        assert (out / f"{name}.log").is_file()

    parts = parts_of(out)
    assert list(parts) == names and all(p["status"] == "ok" for p in parts.values())
    env = parts["env"]["numbers"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert Path(env["checkout"]) == ROOT

    tests = parts["gpu-tests"]["numbers"]  # CUDA hidden: collected, all skipped
    assert tests["tests"] >= 1 and tests["skipped"] == tests["tests"]
    assert tests["failed"] == tests["errors"] == 0

    for kind in ("lrc", "plain"):
        n = parts[f"throughput-{kind}"]["numbers"]
        assert n["tokens_per_s"] > 0 and n["ms_per_step"] > 0 and 0 < n["mfu"] <= 1
        assert n["seq"] == 64 and n["micro_batch"] == 2  # throughput.py --tiny
        assert n["anchor_tokens_per_s"] == {"lrc": 13_288, "plain": 16_864}[kind]
        assert n["anchor_comparable"] is False
        assert f"| {kind} | 2 x 64 | " in summary

    loss = parts["loss-memory"]["numbers"]
    for implementation in ("naive", "chunked", "fused"):
        assert loss[implementation]["peak_mib"] >= 0 and loss[implementation]["ms"] > 0
    assert loss["chunked"]["loss"] == pytest.approx(loss["naive"]["loss"], rel=1e-4)
    assert loss["fused"]["loss"] == pytest.approx(loss["naive"]["loss"], rel=1e-4)
    assert loss["chunked_verdict"] in ("PASS", "FAIL") and loss["fused_ratio"] > 0
    assert "## Loss memory" in summary and "fused/naive peak ratio" in summary

    smoke = parts["fsdp2-smoke"]["numbers"]
    assert smoke["ok"] is True and smoke["steps"] == 4
    assert smoke["strategy"] == "FSDP2Strategy" and smoke["precision"] == "bf16-mixed"
    assert smoke["accelerator"] == "cpu" and smoke["sharded_checkpoint"] is True
    assert smoke["export_matches"] is True and smoke["student_hidden_size"] == 32
    assert all(0 < x < 10 for x in smoke["losses"])


def test_a_failed_part_does_not_stop_the_later_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_wrapper("--cpu-check", "--out", str(out), "--only", "env", "throughput-lrc",
                       "loss-memory", "--inject-failure", "throughput-lrc")  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "[1/3] env ... ok (" in proc.stdout
    assert "[2/3] throughput-lrc ... failed (" in proc.stdout
    assert "[3/3] loss-memory ... ok (" in proc.stdout

    parts = parts_of(out)
    assert list(parts) == ["env", "throughput-lrc", "loss-memory"]
    failed = parts["throughput-lrc"]
    assert failed["status"] == "failed" and failed["returncode"] == 1
    assert failed["reason"] == "exit 1: gpu_suite: injected failure (test hook)"
    assert "gpu_suite: injected failure (test hook)" in failed["log_tail"]
    assert parts["loss-memory"]["status"] == "ok" and parts["loss-memory"]["numbers"]["fused"]
    assert json.loads((out / "summary.json").read_text())["ok"] is False

    summary = (out / "summary.md").read_text()
    assert "**1 of 3 parts not ok**" in summary
    assert "| throughput-lrc | failed |" in summary and "| loss-memory | ok |" in summary
    assert "### throughput-lrc: failed" in summary
    assert "gpu_suite: injected failure (test hook)\n```" in summary  # the log's tail


def test_a_hung_part_is_ended_with_its_children_at_its_limit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_wrapper("--cpu-check", "--out", str(out), "--only", "throughput-lrc",
                       "throughput-plain", "--inject-failure", "throughput-lrc:hang",
                       "--inject-failure", "throughput-plain", "--part-timeout",
                       "throughput-lrc=3")  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "[1/2] throughput-lrc ... timeout (" in proc.stdout
    assert "[2/2] throughput-plain ... failed (" in proc.stdout
    parts = parts_of(out)
    hung = parts["throughput-lrc"]
    assert hung["status"] == "timeout" and hung["timeout_s"] == 3
    assert 3 <= hung["seconds"] < 15
    assert "ran past its limit of 3 s" in hung["reason"]
    log = (out / "throughput-lrc.log").read_text()
    child = int(log.rsplit("child pid", 1)[1].split()[0])  # after the command line
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(child):
        time.sleep(0.1)
    assert not alive(child), "the hung part's child process outlived its limit"
    assert "| throughput-lrc | timeout |" in (out / "summary.md").read_text()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ---------------------------------------------------------------------------------- GPU mode
def test_gpu_mode_commands_limits_and_environment(suite, tmp_path: Path) -> None:
    s = suite.Suite(tmp_path, tmp_path / "work", cpu_check=False, timeouts=suite.GPU_TIMEOUTS)
    assert sum(suite.GPU_TIMEOUTS.values()) < 8 * 60
    assert set(suite.GPU_TIMEOUTS) == set(suite.CPU_TIMEOUTS) == set(suite.PARTS)

    tests = s.command("gpu-tests")
    assert tests[1:5] == ["-m", "pytest", "-m", "gpu"] and tests[-1] == str(ROOT / "tests")
    lrc = s.command("throughput-lrc")
    assert lrc[1] == str(ROOT / "benchmarks" / "throughput.py")
    assert lrc[2:6] == ["--steps-kind", "lrc", "--json", str(tmp_path / "throughput-lrc.json")]
    assert "--tiny" not in lrc and "--device" not in lrc  # the default shape, on CUDA
    loss = " ".join(s.command("loss-memory"))
    assert loss.endswith(
        "--device cuda --dtype bfloat16 --batch 4 --length 2048 --vocab 128256 "
        "--from-hidden 1536 3072"
    )
    assert "--cpu-check" not in s.command("fsdp2-smoke")
    extra = suite.Suite(tmp_path, tmp_path, False, suite.GPU_TIMEOUTS, None, ["--micro-batch", "2"])
    assert extra.command("throughput-plain")[-2:] == ["--micro-batch", "2"]

    env = s.child_env()
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert env["LRKD_CACHE_DIR"] == str(tmp_path / "work" / "cache")
    assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    cpu = suite.Suite(tmp_path, tmp_path / "work", cpu_check=True, timeouts=suite.CPU_TIMEOUTS)
    assert cpu.child_env()["CUDA_VISIBLE_DEVICES"] == ""


H100_ROW = {
    "kind": "lrc", "device_name": "NVIDIA H100 80GB HBM3", "micro_batch": 3,
    "gradient_accumulation": 1, "seq": 2048, "steps": 10, "tokens_per_s": 12_000.0,
    "ms_per_step": 512.0, "peak_memory_bytes": 60 * 2**30,
    "peak_memory_kind": "CUDA max allocated", "ceiling_tflops": 700.0,
    "ceiling_dtype": "bfloat16", "losses": [12.0], "flops_per_token": 2.0e10, "mfu": 0.34,
    "mfu_model_only": 0.3, "achieved_tflops": 240.0, "anchor_tokens_per_s": 13_288.0,
    "anchor_ratio": 12_000 / 13_288, "anchor_comparable": True,
}  # fmt: skip

GPU_LOSS_LOG = """$ python benchmarks/loss_memory.py ...
kind=forward_kl batch=4 length=2048 vocab=128256 dtype=bfloat16 chunk_size=auto device=cuda
each input (and the student gradient): 2004 MiB
implementation    peak extra MiB     time ms          loss
naive                      30000         900      1.000000
chunked                     {chunked}         400      1.000000
fused                        600         300      1.000000
chunked/naive peak ratio: {ratio:.3f} ({verdict}: threshold 0.25)
fused/naive peak ratio: 0.020 (PASS: threshold 0.1)
"""


def test_gpu_mode_judging_and_summary(suite, tmp_path: Path) -> None:
    s = suite.Suite(tmp_path, tmp_path / "work", cpu_check=False, timeouts=suite.GPU_TIMEOUTS)
    payload = {"shape": {"seq": 2048}, "settings": {"precision": "bf16-mixed"},
               "anchors": {"lrc": 13_288.0, "plain": 16_864.0}, "rows": [H100_ROW]}  # fmt: skip
    (tmp_path / "throughput-lrc.json").write_text(json.dumps(payload))
    numbers, reason, _ = s.judge("throughput-lrc", "", 0)
    assert reason is None and numbers["tokens_per_s"] == 12_000.0
    assert numbers["anchor_ratio"] == pytest.approx(12_000 / 13_288)
    oom = {**payload, "rows": [{"kind": "plain", "error": "exit 1: torch.OutOfMemoryError"}]}
    (tmp_path / "throughput-plain.json").write_text(json.dumps(oom))
    _, reason, _ = s.judge("throughput-plain", "", 1)
    assert reason == "exit 1: exit 1: torch.OutOfMemoryError"

    good = GPU_LOSS_LOG.format(chunked=4500, ratio=0.15, verdict="PASS")
    numbers, reason, _ = s.judge("loss-memory", good, 0)
    assert reason is None and numbers["naive"]["peak_mib"] == 30000
    assert numbers["chunked_ratio"] == 0.15 and numbers["fused_verdict"] == "PASS"
    bad = GPU_LOSS_LOG.format(chunked=9000, ratio=0.3, verdict="FAIL")
    _, reason, _ = s.judge("loss-memory", bad, 1)
    assert reason == "exit 1: FAIL chunked/naive 0.300 > 0.25"  # a real FAIL on a GPU

    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite tests="2" failures="0" errors="0" skipped="2">'
        '<testcase classname="t" name="a"><skipped/></testcase>'
        '<testcase classname="t" name="b"><skipped/></testcase></testsuite></testsuites>'
    )
    _, reason, _ = s.judge("gpu-tests", "", 0)
    assert reason == "all 2 GPU tests were skipped on a CUDA machine"
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b">'
        '<failure message="AssertionError: boom&#10;more">trace</failure></testcase>'
        "</testsuite></testsuites>"
    )
    numbers, reason, _ = s.judge("gpu-tests", "", 1)
    assert reason == "1 of 2 GPU tests failed" and numbers["passed"] == 1
    assert numbers["failures"] == ["t::b: AssertionError: boom"]

    results = [
        suite.PartResult("throughput-lrc", "ok", 40.0, 90.0, 0,
                         numbers=s.judge("throughput-lrc", "", 0)[0]),
        suite.PartResult("loss-memory", "failed", 20.0, 60.0, 1, reason="exit 1: FAIL x",
                         numbers=s.judge("loss-memory", bad, 1)[0], log_tail=["last line"]),
    ]  # fmt: skip
    env = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.1,
           "capability": "sm_90", "bf16": True, "driver": "570.1", "torch": "2.11.0",
           "torch_cuda_build": "12.8", "transformers": "5.17.0", "lightning": "2.6.0",
           "lrkd": "0.1.0"}  # fmt: skip
    md = suite.summary_markdown(results, env, cpu_check=False, started="now", seconds=60.0)
    assert "Mode: GPU." in md and "NVIDIA H100 80GB HBM3 (79.1 GiB, sm_90, bf16 yes" in md
    assert "| lrc | 3 x 2048 | 12,000 | 512.0 | 60.0 GiB | 34.0% | 30.0% | 13,288" in md
    assert "| 0.903 |" in md  # comparable: on an H100, no asterisk
    assert "| 29,320 |" in md  # the student-alone anchor
    assert "### loss-memory: failed" in md and "last line" in md
    assert "chunked                     9000" in md  # the table, verbatim


def test_the_output_folder_is_out_when_set_else_gpu_suite_out(suite, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path / "harvest"))
    assert suite.main(["--cpu-check", "--only", "env"]) == 0
    assert json.loads((tmp_path / "harvest" / "summary.json").read_text())["ok"] is True
    monkeypatch.delenv("OUT")
    assert suite.main(["--cpu-check", "--only", "env"]) == 0
    summary = (tmp_path / "gpu_suite_out" / "summary.md").read_text()
    assert "| 1 | env | ok |" in summary and "**all parts ok**" in summary
