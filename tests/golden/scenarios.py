"""Golden runs: fixed-seed ``lrkd fit`` runs whose per-step losses and final student weights
are recorded in ``trajectories.json`` and must not change when code is moved around.

Five runs of a tiny random Llama teacher through the CLI, each a few optimizer steps: plain KD,
a Low-Rank Clone with its clone loss (two micro-batches per step), PACED weights from the
student's rollouts, a two-stage run across its switch to on-policy reverse KL, and on-policy
steps. Record again (only when a change of numbers is intended and explained) with::

    python tests/golden/scenarios.py --record

On the machine that recorded them (same CPU model and torch), the test asserts equality bit for
bit; elsewhere, where BLAS kernels differ, to a relative 1e-4 on every loss and every
parameter's sum and norm, and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback

from lrkd.data.verifiers import Verifier

GOLDEN = Path(__file__).with_name("trajectories.json")
STEPS = 4


class EvenFirstCharacter(Verifier):
    """Accepts a completion whose first character has an even code (a random tiny model passes
    about half the time, so pass rates spread)."""

    def extract(self, completion: str) -> str | None:
        return completion[:1] or None

    def matches(self, candidate: str, answer: str) -> bool:
        return ord(candidate) % 2 == 0


class RecordLosses(Callback):
    """Keeps every training batch's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _trainer(root: Path, **extra: Any) -> dict[str, Any]:
    return {
        "max_steps": STEPS,
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": str(root),
        "callbacks": [{"class_path": "golden.scenarios.RecordLosses"}],
        **extra,
    }


def _plain_student() -> dict[str, Any]:
    return {
        "class_path": "lrkd.models.students.FromTeacherConfig",
        "init_args": {"hidden_size": 32, "num_hidden_layers": 1, "seed": 0},
    }


def _paced_data(root: Path, teacher: Path, weighting: str) -> dict[str, Any]:
    return {
        "class_path": "lrkd.data.datamodule.DistillDataModule",
        "init_args": {
            "tokenizer": str(teacher),
            "num_problems": 24,
            "val_fraction": 0.25,
            "chat_template": False,
            "verifier": {"class_path": "golden.scenarios.EvenFirstCharacter"},
            "teacher_responses": {"max_new_tokens": 6, "cache_dir": str(root / "responses")},
            "rollouts": {"num_samples": 4, "max_new_tokens": 4},
            "pacing": {"weighting": weighting},
            "validation": {"num_samples": 2},
            "batch_size": 4,
            "seq_length": 48,
            # The word problems' prompts (up to 115 tokens) are longer than seq_length: recorded
            # before data.overlong existed, these runs keep them as they were cut.
            "overlong": "keep",
        },
    }


def configs(root: Path, teacher: Path) -> dict[str, dict[str, Any]]:
    """The golden runs' configs, by name (``teacher``: the tiny teacher's directory)."""
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}}
    text = {
        "class_path": "lrkd.data.text.TextDataModule",
        "init_args": {"seq_length": 32, "batch_size": 4, "builtin_documents": 200},
    }
    model = {"teacher": str(teacher), "teacher_dtype": "float32", "optimizer": optimizer}
    return {
        "plain_kd": {
            "trainer": _trainer(root),
            "model": {**model, "student": _plain_student(), "loss": {"ce_weight": 0.5}},
            "data": text,
        },
        "lrc_clone": {
            "trainer": _trainer(root, accumulate_grad_batches=2),
            "model": {
                **model,
                "student": {
                    "class_path": "lrkd.models.lowrank.LowRankCloneBuilder",
                    "init_args": {"hidden_size": 32, "seed": 0},
                },
                "loss": {"ce_weight": 0.5, "clone_weight": 0.5},
            },
            "data": text,
        },
        "paced": {
            "trainer": _trainer(root),
            "model": {**model, "student": _plain_student()},
            "data": _paced_data(root, teacher, "paced"),
        },
        "two_stage": {
            "trainer": _trainer(
                root,
                callbacks=[
                    {"class_path": "golden.scenarios.RecordLosses"},
                    {
                        "class_path": "lrkd.callbacks.two_stage.TwoStageKL",
                        "init_args": {"switch_step": 2},
                    },
                ],
            ),
            "model": {**model, "student": _plain_student(), "on_policy": {"max_new_tokens": 4}},
            "data": _paced_data(root, teacher, "paced"),
        },
        "on_policy": {
            "trainer": _trainer(root),
            "model": {
                **model,
                "student": _plain_student(),
                "loss": {"divergence": "reverse_kl"},
                "on_policy": {"fraction": 1.0, "max_new_tokens": 4},
            },
            "data": _paced_data(root, teacher, "uniform"),
        },
    }


def make_teacher(path: Path) -> Path:
    """The tiny random Llama teacher (seed 0) and its character tokenizer, saved in ``path``."""
    from conftest import make_tiny_llama, make_tokenizer

    make_tiny_llama(seed=0).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def weights_summary(student: torch.nn.Module) -> dict[str, Any]:
    """A sha256 over the student's state (sorted names, exact bytes), and per tensor its sum and
    L2 norm in float64 (for machines whose kernels round differently)."""
    digest = hashlib.sha256()
    tensors = {}
    for name, tensor in sorted(student.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(t.numpy().tobytes())
        d = t.double()
        tensors[name] = [float(d.sum()), float(d.norm())]
    return {"sha256": digest.hexdigest(), "tensors": tensors}


def machine() -> dict[str, str]:
    """What decides bit-exactness: the CPU model and the torch build."""
    from lrkd.env import cpu_description

    return {"cpu": cpu_description(), "torch": torch.__version__, "python": platform.machine()}


def run(name: str, root: Path, teacher: Path) -> dict[str, Any]:
    """Run one golden config through ``lrkd fit``: its losses and final student weights."""
    from lrkd.cli import main

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"seed_everything": 0, **configs(root, teacher)[name]}))
    cli = main(["fit", "--config", str(path)])
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, RecordLosses))
    return {"losses": recorder.losses, "weights": weights_summary(cli.model.student)}


def record(out: Path = GOLDEN) -> None:
    """Run every golden config and write ``trajectories.json``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_teacher(Path(tmp) / "teacher")
        runs = {name: run(name, Path(tmp) / name, teacher) for name in configs(Path(tmp), teacher)}
    out.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}: " + ", ".join(f"{k} {len(v['losses'])} steps" for k, v in runs.items()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, golden
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="run and write trajectories.json")
    if parser.parse_args().record:
        from golden.scenarios import record as record_here  # the module configs name

        record_here()
    else:
        parser.print_help()
