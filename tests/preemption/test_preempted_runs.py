"""A pre-empted or killed ``lrkd fit`` keeps its work: on SIGTERM it saves a checkpoint and
exits non-zero; after SIGTERM, SIGKILL in training or SIGKILL in the middle of a checkpoint
write, the run resumed from the last complete checkpoint trains exactly the uninterrupted run's
steps (losses and final weights equal bit for bit), and no partial checkpoint is left behind, in
the checkpoint directory or in $TMPDIR.

Every run is its own ``python -m lrkd.cli fit`` process (tiny teacher, 1-layer student, CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from preemption.tools import (
    fit,
    fit_until,
    losses,
    output_tail,
    paced_data,
    write_config,
)

from lrkd.callbacks.preemption import PREEMPTED_EXIT_STATUS

STEPS = 6
SIGTERM_AT = {"class_path": "preemption.tools.SigtermAt", "init_args": {"step": 3}}
EVERY_2 = {"every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"}


def _reference(root: Path, teacher: Path, **config) -> tuple[dict[int, float], str]:
    """An uninterrupted run: its losses and final weights."""
    out = root / "reference"
    proc = fit(write_config(root / "reference.yaml", teacher, out, STEPS, **config), root / "tmp")
    assert proc.returncode == 0, output_tail(proc)
    return losses(out), _weights(out)


def _weights(out: Path) -> str:
    return (out / "weights_rank0.txt").read_text()


def _step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


def _leftovers(root: Path) -> list[str]:
    """Checkpoint temporaries anywhere under ``root`` and anything at all in the runs' $TMPDIR."""
    temporaries = [str(p) for p in root.rglob(".*.tmp")]
    return temporaries + [str(p) for p in (root / "tmp").rglob("*")]


@pytest.fixture(scope="module")
def text_reference(tmp_path_factory, tiny_teacher_dir) -> tuple[dict[int, float], str]:
    return _reference(tmp_path_factory.mktemp("text"), tiny_teacher_dir)


def test_sigterm_saves_last_exits_143_and_the_same_command_resumes(
    tmp_path, tiny_teacher_dir, text_reference
) -> None:
    """SIGTERM after step 3: last.ckpt (a regular file replacing ModelCheckpoint's link to
    step=2.ckpt, which keeps its content), exit 143; the same command again (``--ckpt_path
    last``, which also starts the first run from scratch) finishes with the reference's losses
    and weights."""
    expected_losses, expected_weights = text_reference
    out = tmp_path / "run"
    checkpoint = {**EVERY_2, "save_last": "link"}
    config = write_config(
        tmp_path / "run.yaml",
        tiny_teacher_dir,
        out,
        STEPS,
        callbacks=[SIGTERM_AT],
        checkpoint=checkpoint,
    )

    first = fit(config, tmp_path / "tmp", "--ckpt_path", "last")
    assert first.returncode == PREEMPTED_EXIT_STATUS, output_tail(first)
    last = out / "ckpt" / "last.ckpt"
    assert f"lrkd: SIGTERM: saved {last} at step 3" in first.stderr
    assert last.is_file() and not last.is_symlink() and _step(last) == 3
    assert _step(out / "ckpt" / "step=2.ckpt") == 2
    assert sorted(losses(out)) == [0, 1, 2]

    second = fit(config, tmp_path / "tmp", "--ckpt_path", "last")
    assert second.returncode == 0, output_tail(second)
    assert losses(out) == expected_losses
    assert _weights(out) == expected_weights
    assert not list((out / "ckpt").glob("last-v*")), sorted((out / "ckpt").iterdir())
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_sigterm_in_a_paced_run_resumes_bit_for_bit(tmp_path, tiny_teacher_dir) -> None:
    """A DistillDataModule run (pass rates re-estimated every 2 steps, mid-epoch), SIGTERM
    after step 3, resumed from the explicit path: the reference's losses and weights; with
    ModelCheckpoint ``save_last: true`` the resumed run keeps writing last.ckpt (not
    last-v1.ckpt)."""
    data = paced_data(tiny_teacher_dir, tmp_path / "responses")
    expected_losses, expected_weights = _reference(tmp_path, tiny_teacher_dir, data=data)
    out = tmp_path / "run"
    checkpoint = {**EVERY_2, "save_last": True}
    config = write_config(
        tmp_path / "run.yaml",
        tiny_teacher_dir,
        out,
        STEPS,
        data=data,
        callbacks=[SIGTERM_AT],
        checkpoint=checkpoint,
    )

    first = fit(config, tmp_path / "tmp")
    assert first.returncode == PREEMPTED_EXIT_STATUS, output_tail(first)
    last = out / "ckpt" / "last.ckpt"
    assert _step(last) == 3

    second = fit(config, tmp_path / "tmp", "--ckpt_path", str(last))
    assert second.returncode == 0, output_tail(second)
    assert losses(out) == expected_losses
    assert _weights(out) == expected_weights
    assert _step(last) == STEPS and not list((out / "ckpt").glob("last-v*"))
    assert _leftovers(tmp_path) == []


def test_sigkill_in_training_resumes_from_the_last_checkpoint(
    tmp_path, tiny_teacher_dir, text_reference
) -> None:
    """SIGKILL once 4 steps are recorded (checkpoints every 2 steps; the run stalls after step 4,
    so that the kill lands before the end however fast the steps are); the same command with
    ``--ckpt_path last`` trains the rest; the steps trained twice have the same losses."""
    expected_losses, expected_weights = text_reference
    out = tmp_path / "run"
    stall = {"class_path": "preemption.tools.StallAfter",
             "init_args": {"step": 4, "marker": str(tmp_path / "stalled")}}  # fmt: skip
    config = write_config(tmp_path / "run.yaml", tiny_teacher_dir, out, STEPS,
                          checkpoint={**EVERY_2, "save_last": True}, callbacks=[stall])  # fmt: skip

    status, log = fit_until(config, tmp_path / "tmp", lambda: len(losses(out)) >= 4)
    assert status == -9, log[-3000:]
    assert len(losses(out)) < STEPS  # killed before the end
    resumed_from = _step(out / "ckpt" / "last.ckpt")
    assert resumed_from in (2, 4)

    second = fit(config, tmp_path / "tmp", "--ckpt_path", "last")
    assert second.returncode == 0, output_tail(second)
    assert losses(out) == expected_losses  # steps trained twice agree (checked when read)
    assert _weights(out) == expected_weights
    assert _leftovers(tmp_path) == []


def test_sigkill_during_a_checkpoint_write_leaves_no_partial_file(
    tmp_path, tiny_teacher_dir, text_reference
) -> None:
    """SIGKILL halfway through writing step=4.ckpt: the half-written file is the hidden
    temporary beside it (nothing in $TMPDIR, no step=4.ckpt); the same command resumed from
    step=2.ckpt removes that temporary as it starts and trains the reference's steps."""
    expected_losses, expected_weights = text_reference
    out, marker = tmp_path / "run", tmp_path / "stalled"
    stalling = {"class_path": "preemption.tools.StallingCheckpointIO",
                "init_args": {"stall_step": 4, "marker": str(marker)}}  # fmt: skip
    config = write_config(tmp_path / "run.yaml", tiny_teacher_dir, out, STEPS, checkpoint=EVERY_2,
                          plugins=[stalling])  # fmt: skip

    status, log = fit_until(config, tmp_path / "tmp", marker.exists)
    assert status == -9 and marker.exists(), log[-3000:]
    checkpoints = out / "ckpt"
    partial = [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert len(partial) == 1 and partial[0].startswith(".step=4.ckpt.")
    assert not (checkpoints / "step=4.ckpt").exists()
    assert list((tmp_path / "tmp").iterdir()) == []

    second = fit(config, tmp_path / "tmp", "--ckpt_path", str(checkpoints / "step=2.ckpt"))
    assert second.returncode == 0, output_tail(second)
    assert "removed 1 partial checkpoint file(s)" in second.stderr
    assert losses(out) == expected_losses
    assert _weights(out) == expected_weights
    assert _step(checkpoints / "step=4.ckpt") == 4
    assert _leftovers(tmp_path) == []
