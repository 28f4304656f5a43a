"""TRL's GKDTrainer set up for off-policy forward-KL steps (``lmbda=0``, ``beta=0``), driven one
``training_step`` at a time on given batches (``Trainer.train`` is never called): shared by
``throughput.py --trl`` and ``vs_trl.py``."""

from __future__ import annotations

import os
import tempfile
from typing import Any


def gkd_trainer(
    student: Any,
    teacher: Any,
    tokenizer: Any | None,
    *,
    micro_batch: int,
    max_length: int,
    bf16: bool,
    use_cpu: bool,
    accumulation: int = 1,
    temperature: float = 1.0,
    gradient_checkpointing: bool = False,
    **config: Any,
) -> Any:
    """A GKDTrainer ready for ``trainer.training_step(trainer.model, gkd_batch(batch))``.

    Its dataset is one dummy conversation (the collator is never used), so ``tokenizer`` only
    has to exist: ``None`` makes a three-token one.

    Args:
        student, teacher: the Hugging Face causal LMs.
        tokenizer: the processing class, or ``None``.
        micro_batch, max_length, bf16, use_cpu, accumulation, temperature,
        gradient_checkpointing: the GKDConfig fields of the same meaning.
        **config: further GKDConfig fields (``learning_rate``, ``max_grad_norm``, ...).
    """
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer  # trl >= 1.0
    except ImportError:
        from trl import GKDConfig, GKDTrainer  # older trl
    from datasets import Dataset

    if tokenizer is None:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
            pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
        )  # fmt: skip
    args = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_gkd_"),
        lmbda=0.0,
        beta=0.0,
        temperature=temperature,
        seq_kd=False,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        bf16=bf16,
        max_length=max_length,
        gradient_checkpointing=gradient_checkpointing,
        use_cpu=use_cpu,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        **config,
    )
    messages = [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"messages": messages}),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = accumulation  # train() sets it every step
    return trainer


def gkd_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """An lrkd batch (``input_ids``, ``attention_mask``; every position after the first a
    target) as GKDTrainer takes it: a one-token prompt and ``labels`` with the prompt masked,
    so both compute the loss on the same tokens."""
    labels = batch["input_ids"].clone()
    labels[:, :1] = -100
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": labels,
        "prompts": batch["input_ids"][:, :1],
        "prompt_attention_mask": batch["attention_mask"][:, :1],
    }
