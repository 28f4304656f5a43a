"""Under DDP (2 CPU processes, gloo), a SIGTERM stops both ranks at the same step, whichever
rank gets it: one checkpoint is saved, the run exits 143, and the same command with
``--ckpt_path last`` finishes with every rank's losses and the final weights of the
uninterrupted run, bit for bit. (With Lightning's own SIGTERM handling, a signal on rank 1 only
makes rank 1 leave alone and rank 0 fail in its next collective: the handler runs a broadcast
on rank 1 alone.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from preemption.tools import fit, losses, output_tail, write_config

from lrkd.callbacks.preemption import PREEMPTED_EXIT_STATUS

STEPS = 5
DDP = {"devices": 2, "strategy": "ddp"}


def _config(root: Path, teacher: Path, name: str, callbacks: list) -> Path:
    return write_config(root / f"{name}.yaml", teacher, root / name, STEPS, callbacks=callbacks,
                        **DDP)  # fmt: skip


def _weights(out: Path) -> list[str]:
    return [(out / f"weights_rank{r}.txt").read_text() for r in range(2)]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tiny_teacher_dir) -> tuple[list[dict[int, float]], list[str]]:
    root = tmp_path_factory.mktemp("ddp")
    proc = fit(_config(root, tiny_teacher_dir, "reference", []), root / "tmp")
    assert proc.returncode == 0, output_tail(proc)
    out = root / "reference"
    return [losses(out, r) for r in range(2)], _weights(out)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("signalled", [1, None], ids=["rank1_only", "every_rank"])
def test_sigterm_stops_every_rank_at_the_same_step_and_resumes(
    tmp_path, tiny_teacher_dir, ddp_reference, signalled: int | None
) -> None:
    expected_losses, expected_weights = ddp_reference
    assert expected_losses[0] != expected_losses[1]  # the ranks train on different batches
    sigterm = {"class_path": "preemption.tools.SigtermAt",
               "init_args": {"step": 3, "rank": signalled}}  # fmt: skip
    config = _config(tmp_path, tiny_teacher_dir, "run", [sigterm])
    out = tmp_path / "run"

    first = fit(config, tmp_path / "tmp", "--ckpt_path", "last", timeout=180)
    assert first.returncode == PREEMPTED_EXIT_STATUS, output_tail(first)
    for rank in range(2):
        stopped = json.loads((out / f"stopped_rank{rank}.json").read_text())
        assert stopped == {"step": 3, "exception": "Preempted"}, (rank, stopped)
        assert sorted(losses(out, rank)) == [0, 1, 2]
    last = out / "ckpt" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3

    second = fit(config, tmp_path / "tmp", "--ckpt_path", "last", timeout=180)
    assert second.returncode == 0, output_tail(second)
    assert [losses(out, r) for r in range(2)] == expected_losses
    assert _weights(out) == expected_weights
    assert not list(tmp_path.rglob(".*.tmp")) and not list((tmp_path / "tmp").iterdir())
