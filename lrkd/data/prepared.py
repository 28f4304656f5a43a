"""Training examples read from a prepared directory (``lrkd prepare``), memory-mapped.

Nothing is loaded up front: ``datasets`` maps the Arrow files, and an example's tokens are read
when it is asked for, so a process's memory does not grow with the corpus, and each DDP/FSDP
rank reads only the examples its sampler deals it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lrkd.data.teacher_cache import expand_targets

__all__ = ["PreparedExamples"]


class PreparedExamples(Dataset):
    """One split of a prepared directory: examples of ``input_ids``, ``attention_mask`` and
    ``loss_mask`` [L] (int64), every token a target except a prompt's; from a teacher cache
    also the teacher's ``topk_ids``, ``topk_logprobs`` [L, k] and ``tail_logprob`` [L]
    (:func:`lrkd.data.teacher_cache.expand_targets`).

    Args:
        path: the split's directory (``<prepared>/train`` or ``<prepared>/val``).
    """

    def __init__(self, path: str | Path) -> None:
        from datasets import load_from_disk

        self.path = Path(path)
        self.data = load_from_disk(str(self.path)).with_format("numpy")
        self.has_prompts = "prompt_length" in self.data.column_names
        self.has_teacher = "topk_ids" in self.data.column_names

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """A batch's examples in one read (the DataLoader calls this instead of
        ``__getitem__`` for every index)."""
        rows = self.data[[int(i) for i in indices]]
        prompts = rows["prompt_length"] if self.has_prompts else [0] * len(indices)
        examples = [self._example(ids, p) for ids, p in zip(rows["input_ids"], prompts,
                                                            strict=True)]  # fmt: skip
        if self.has_teacher:
            columns = zip(rows["topk_ids"], rows["topk_logprobs"], rows["tail_logprob"],
                          strict=True)  # fmt: skip
            for example, prompt, (ids, logprobs, tail) in zip(examples, prompts, columns,
                                                              strict=True):  # fmt: skip
                length = len(example["input_ids"])
                example.update(expand_targets(ids, logprobs, tail, length, int(prompt)))
        return examples

    @staticmethod
    def _example(ids: Any, prompt_length: Any) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        ones = torch.ones_like(input_ids)
        if not prompt_length:
            return {"input_ids": input_ids, "attention_mask": ones, "loss_mask": ones}
        loss_mask = (torch.arange(len(input_ids)) >= int(prompt_length)).long()
        return {"input_ids": input_ids, "attention_mask": ones, "loss_mask": loss_mask}
