"""Teacher responses for forward-KL data: generated once per problem, cached on disk.

The cache file is keyed by the teacher's identity (class, config and a sample of its weights),
the generation settings, the EOS id and the prompts, so a changed teacher, template or setting
never reuses stale responses. With several processes each rank generates a share of the
problems, the shares are gathered, and rank 0 writes the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrkd.generation.sampling import generate, generation_model
from lrkd.models.zoo import cache_dir

log = logging.getLogger("lrkd")

__all__ = ["model_fingerprint", "response_cache_path", "teacher_responses"]


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model: its class, config and a sample of its weights (the same
    whether the model is sharded by FSDP2 or not; all ranks must call it together then)."""
    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256(type(model).__name__.removeprefix("FSDP").encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    params = list(model.parameters())
    for param in params[:2] + params[-2:]:
        tensor = param.full_tensor() if isinstance(param, DTensor) else param
        sample = tensor.detach().flatten()[:4096].float().cpu()
        digest.update(str(param.dtype).encode() + sample.numpy().tobytes())
    return digest.hexdigest()


def response_cache_path(
    teacher: nn.Module,
    keys: Sequence[str],
    prompts: Sequence[Sequence[int]],
    settings: dict[str, Any],
    eos_token_id: Any,
    root: str | None = None,
) -> Path:
    """The cache file of these responses under ``root`` (``None``: ``$LRKD_CACHE_DIR/responses``,
    default ``~/.cache/lrkd/responses``)."""
    digest = hashlib.sha256()
    digest.update(model_fingerprint(teacher).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(str(eos_token_id).encode())
    for key, prompt in zip(keys, prompts, strict=True):
        digest.update(f"{key}\0{list(prompt)}\0".encode())
    base = Path(root) if root is not None else cache_dir() / "responses"
    return base / f"teacher-{digest.hexdigest()[:20]}.jsonl"


def teacher_responses(
    teacher: nn.Module,
    prompts: Sequence[Sequence[int]],
    keys: Sequence[str],
    tokenizer: Any,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    cache_root: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    label: str = "",
) -> list[list[int]]:
    """The teacher's response token ids (ending with EOS when complete) to each prompt, from the
    cache when it holds them, else generated (and cached by rank 0).

    Args:
        teacher: the teacher (sharded by FSDP2 or not: every rank must call this together).
        prompts: the teacher's prompt token ids, one per problem.
        keys: each problem's stable id (names its random numbers and the cache rows).
        tokenizer: gives the EOS and padding ids.
        max_new_tokens, temperature, seed: generation settings (part of the cache key).
        batch_size: sequences per forward pass.
        cache_root: the cache folder (``None``: the default, see :func:`response_cache_path`).
        rank, world_size: this process and the number of processes.
        label: names the split in progress bars and log lines.
    """
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    path = response_cache_path(teacher, keys, prompts, settings, tokenizer.eos_token_id, cache_root)
    if path.is_file():
        cached = [json.loads(line) for line in path.read_text().splitlines()]
        if [c["id"] for c in cached] == list(keys):
            log.info("lrkd: %d %s teacher responses from %s", len(cached), label, path)
            return [c["ids"] for c in cached]
    model = generation_model(teacher)  # sharded (FSDP2): an unsharded copy on every rank
    rollouts = generate(
        model,
        list(prompts[rank::world_size]),
        num_samples=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        keys=list(keys[rank::world_size]),
        progress=f"teacher responses ({label})" if rank == 0 else False,
        **settings,
    )
    del model
    mine = [c[0] for c in rollouts.completion_ids]
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, mine)
        ids = [gathered[i % world_size][i // world_size] for i in range(len(prompts))]
    else:
        ids = mine
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps({"id": k, "ids": r}) + "\n"
                               for k, r in zip(keys, ids, strict=True)))  # fmt: skip
        tmp.replace(path)
        log.info("lrkd: cached %d %s teacher responses at %s", len(ids), label, path)
    return ids
