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
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest helpers

from resume_runs import ddp_fit, full_first_resumed

from lrkd.data.corpus import builtin_corpus
from lrkd.data.text import TextDataModule
from lrkd.distributed import close_process_group

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
        ckpt: Path | None) -> None:  # fmt: skip
    datamodule = TextDataModule(
        train_files=data_files(out), tokenizer=str(teacher_dir), seq_length=SEQ_LENGTH,
        batch_size=BATCH, val_fraction=0.0, cache_dir=str(out / "cache"),
        streaming=mode == "streaming", shuffle_buffer=8,
    )  # fmt: skip
    ddp_fit(out, teacher_dir, mode, run, max_steps, ckpt, datamodule, Record())


def main(out_dir: str, stop_at: int, total: int) -> None:
    out = Path(out_dir)
    data_files(out)
    full_first_resumed(out, ("prepared", "streaming"), fit, stop_at, total)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    close_process_group()
