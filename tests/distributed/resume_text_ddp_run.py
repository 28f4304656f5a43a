"""Uninterrupted, stopped and resumed text runs on 2 CPU processes (DDP, gloo), recording the
tokens of every training batch.

Usage: python resume_text_ddp_run.py OUT_DIR STOP_AT TOTAL. For each data mode (``prepared``:
raw files prepared on first use into a cache, then read memory-mapped; ``streaming``: the same
files streamed) it trains TOTAL steps, then STOP_AT steps (checkpointing every step), then
resumes that run from its step-STOP_AT checkpoint to TOTAL steps; each rank writes
OUT_DIR/<mode>_<run>_rank<r>.json with the (epoch, input_ids rows) of every batch it trained on.
Run as its own process: DDP re-executes this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest helpers

from conftest import make_tiny_llama, make_tokenizer

from lrkd.data.corpus import builtin_corpus
from lrkd.data.text import TextDataModule
from lrkd.distributed import close_process_group
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule

SEQ_LENGTH, BATCH = 32, 4


class Record(Callback):
    def __init__(self) -> None:
        self.seen: list[list] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append([trainer.current_epoch, batch["input_ids"].tolist()])


def data_files(out: Path) -> list[str]:
    """Four JSONL files of built-in documents (written once, before DDP starts)."""
    files = [out / "corpus" / f"part{i}.jsonl" for i in range(4)]
    if not files[0].exists():
        files[0].parent.mkdir(parents=True)
        docs = builtin_corpus(16, seed=5)
        for i, f in enumerate(files):
            f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i * 4 : i * 4 + 4]))
    return [str(f) for f in files]


def fit(out: Path, teacher_dir: Path, mode: str, run: str, max_steps: int,
        ckpt: Path | None = None) -> None:  # fmt: skip
    datamodule = TextDataModule(
        train_files=data_files(out), tokenizer=str(teacher_dir), seq_length=SEQ_LENGTH,
        batch_size=BATCH, val_fraction=0.0, cache_dir=str(out / "cache"),
        streaming=mode == "streaming", shuffle_buffer=8,
    )  # fmt: skip
    module = DistillationModule(
        teacher=str(teacher_dir), teacher_dtype="float32",
        student=FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0),
    )  # fmt: skip
    record = Record()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[record, ModelCheckpoint(dirpath=out / f"{mode}_{run}_ckpt", save_top_k=-1,
                                           every_n_train_steps=1, filename="{step}")],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    path = out / f"{mode}_{run}_rank{trainer.global_rank}.json"
    path.write_text(json.dumps(record.seen))


def main(out_dir: str, stop_at: int, total: int) -> None:
    out = Path(out_dir)
    teacher_dir = out / "teacher"
    if not (teacher_dir / "config.json").exists():  # written once, before DDP starts
        make_tiny_llama(seed=0).save_pretrained(teacher_dir)
        make_tokenizer().save_pretrained(teacher_dir)
    data_files(out)
    for mode in ("prepared", "streaming"):
        fit(out, teacher_dir, mode, "full", total)
        fit(out, teacher_dir, mode, "first", stop_at)
        fit(out, teacher_dir, mode, "resumed", total,
            out / f"{mode}_first_ckpt" / f"step={stop_at}.ckpt")  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    close_process_group()
