"""Batched, KV-cached sampling of completions from a causal language model.

One function, :func:`generate`, serves everything in lrkd that makes a model write: the
student's K rollouts per problem for pass-rate estimation, greedy answers for validation
pass@1, the teacher's responses for forward-KL data, and the student's own continuations in the
on-policy (reverse-KL) stage.

Any Hugging Face causal LM works (its KV cache is used: each new token costs one position of
compute), and so does any ``nn.Module`` that maps ``input_ids`` [B, L] to logits [B, L, V]
(re-run on the whole sequence each step, with prompts batched by equal length so that no
padding shifts its positions). A :class:`~lrkd.models.lowrank.LowRankClone` is materialised
into a plain model first (:func:`generation_model`).

Sampling is reproducible row by row: the random numbers of a completion come from its own
generator, seeded by ``(seed, key, sample index)``, where the key names the prompt (a problem
id). So a completion does not depend on which other prompts share its batch, on the batch
size, or on how prompts are split over processes: estimating pass rates on 2 ranks gives the
same completions as on 1 (for a model whose logits for a row do not depend on the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from tqdm.auto import tqdm

from lrkd._compat import forward_with_kv_cache, supports_kv_cache
from lrkd.data.sampling_settings import check_sampling
from lrkd.data.stops import StopSequences
from lrkd.distributed import gathered_copy, is_sharded
from lrkd.models.protocols import Materializable
from lrkd.models.students import model_logits
from lrkd.seeds import row_seed

__all__ = ["Rollouts", "generate", "generation_model", "sample_tokens"]


@dataclass
class Rollouts:
    """Completions of a set of prompts, ``num_samples`` per prompt.

    Attributes:
        completion_ids: ``completion_ids[i][k]`` is the k-th completion of prompt i as token
            ids, ending with the EOS token (or a stop token id, or the token that completed a
            stop string) when the model produced one (then ``finished[i][k]``) and cut at
            ``max_new_tokens`` otherwise.
        finished: whether each completion ended with EOS or a stop sequence.
        texts: the decoded completions (without special tokens, cut before a stop sequence)
            when a tokenizer was given.
    """

    completion_ids: list[list[list[int]]]
    finished: list[list[bool]]
    texts: list[list[str]] | None = field(default=None)


def generation_model(model: nn.Module, reuse: nn.Module | None = None) -> nn.Module:
    """The module to generate with.

    A low-rank clone is multiplied out into a plain Hugging Face model on the clone's device (one
    weight generation, then KV-cached decoding); a model sharded by FSDP2 is gathered into an
    unsharded copy on every rank (so that ranks can sample different prompts and stop at
    different lengths without waiting for each other; every rank must call this together); any
    other model is returned as it is.

    Args:
        model: the model that should write.
        reuse: a model returned by an earlier call for the same model; its weights are
            refreshed in place rather than building a new model (much faster when called every
            training step).
    """
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise NotImplementedError(
            "Generation (pass-rate estimation, on-policy steps, teacher responses) does not run "
            "under FSDP1 (LayerWiseFSDPStrategy); use lrkd.distributed.FSDP2Strategy, or DDP."
        )
    if isinstance(model, Materializable):
        if reuse is not None:
            return model.materialize(into=reuse)
        param = next(model.parameters())
        return model.materialize().to(param.device)
    if is_sharded(model):
        return gathered_copy(model, into=reuse)
    return model


def sample_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """Draw one token per row by inverse-CDF sampling with the given uniforms in [0, 1)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # Below the total mass, strictly (u rounded up to 1 would run past the last token), and
    # right=True never lands on a zero-probability token: its cdf equals its predecessor's.
    target = torch.minimum(
        uniforms.to(cdf.device, cdf.dtype).unsqueeze(-1) * total,
        torch.nextafter(total, torch.zeros_like(total)),
    )
    index = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[-1] - 1)
    if order is not None:
        index = order.gather(-1, index)
    return index.squeeze(-1)


@torch.no_grad()
def _generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    uniforms: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: set[int],
    pad_token_id: int,
    kv_cache: bool,
    device: torch.device,
    stop: StopSequences | None = None,
    tokenizer: Any = None,
) -> tuple[list[list[int]], list[bool]]:
    stop = stop or StopSequences()
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    eos = torch.tensor(sorted(eos_ids | stop.token_ids), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)

    past = None
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    step_ids, step_positions = input_ids, position_ids
    for step in range(max_new_tokens):
        if kv_cache:
            logits, past = forward_with_kv_cache(
                model, step_ids, attention_mask, step_positions, past
            )
            logits = logits[:, -1]
        else:  # equal-length prompts (no padding): re-run the whole sequence
            logits = model_logits(model, input_ids, attention_mask)[:, -1]
        token = sample_tokens(logits, uniforms[:, step], temperature, top_p)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        new_tokens[:, step] = token
        ended = ~done & torch.isin(token, eos)
        if stop.strings:  # decode the rows still writing (a stop string may span tokens)
            for row in (~done & ~ended).nonzero().flatten().tolist():
                ids = new_tokens[row, : step + 1].tolist()
                text = tokenizer.decode(ids, skip_special_tokens=True)
                if stop.find(text) is not None:
                    ended[row] = True
        lengths = torch.where(ended, torch.full_like(lengths, step + 1), lengths)
        done |= ended
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)[:, None]], dim=1)
        step_ids = token[:, None]
        step_positions = step_positions[:, -1:] + 1
        if not kv_cache:
            input_ids = torch.cat([input_ids, step_ids], dim=1)
    new_tokens, lengths, done = new_tokens.cpu(), lengths.cpu(), done.cpu()
    completions = [new_tokens[row, : lengths[row]].tolist() for row in range(batch)]
    return completions, done.tolist()


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    keys: Sequence[str | int] | None = None,
    tokenizer: object | None = None,
    progress: bool | str = False,
    stop: Sequence[str | int] | StopSequences | None = None,
) -> Rollouts:
    """Sample ``num_samples`` completions of each prompt.

    Rows (one per prompt and sample) are sorted by prompt length and generated
    ``batch_size`` at a time; a batch stops once every row has produced EOS. The model is put
    in eval mode for the call and its mode restored afterwards.

    Args:
        model: a causal LM (see the module docs); a low-rank clone must be passed through
            :func:`generation_model` first.
        prompts: token ids of each prompt (already chat-formatted).
        num_samples: completions per prompt (K).
        max_new_tokens: the longest completion.
        temperature: softmax temperature; 0 is greedy decoding.
        top_p: nucleus sampling: sample from the smallest set of tokens whose probability
            reaches ``top_p`` (1 disables it).
        eos_token_id: the token id(s) that end a completion.
        pad_token_id: the id used to pad prompts (masked out); defaults to the first EOS id.
        batch_size: rows per forward pass.
        seed: the base seed; each completion's random numbers depend only on
            ``(seed, key, sample index)``.
        keys: a stable name per prompt (e.g. a problem id); defaults to the prompt's index.
            Give keys when the same prompt must get the same samples in different calls or
            processes.
        tokenizer: when given, the completions are also decoded into ``Rollouts.texts``.
        progress: show a progress bar (a string is used as its label).
        stop: stop strings and/or token ids (:class:`~lrkd.data.stops.StopSequences`):
            a completion also ends where one first appears, and its text is cut before it.
            Stop strings need ``tokenizer``.

    Returns:
        The completions, grouped by prompt.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    check_sampling(max_new_tokens, temperature, top_p)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if keys is not None and len(keys) != len(prompts):
        raise ValueError(f"got {len(keys)} keys for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if not eos_ids:
        raise ValueError("eos_token_id is empty")
    pad = min(eos_ids) if pad_token_id is None else pad_token_id
    stop = stop if isinstance(stop, StopSequences) else StopSequences.of(stop)
    if stop.strings and tokenizer is None:
        raise ValueError(f"stop strings {list(stop.strings)} need a tokenizer to find them")
    keys = list(range(len(prompts))) if keys is None else list(keys)

    rows = [(i, k) for i in range(len(prompts)) for k in range(num_samples)]
    rows.sort(key=lambda row: (len(prompts[row[0]]), row))
    kv_cache = supports_kv_cache(model)
    batches: list[list[tuple[int, int]]] = []
    for row in rows:
        if (
            batches
            and len(batches[-1]) < batch_size
            and (kv_cache or len(prompts[batches[-1][0][0]]) == len(prompts[row[0]]))
        ):
            batches[-1].append(row)
        else:
            batches.append([row])

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    completions: list[list[list[int]]] = [[[] for _ in range(num_samples)] for _ in prompts]
    finished: list[list[bool]] = [[False] * num_samples for _ in prompts]
    was_training = model.training
    model.eval()
    label = progress if isinstance(progress, str) else "generating"
    bar = tqdm(total=len(rows), desc=label, unit="seq", disable=not progress, leave=False)
    try:
        for batch_rows in batches:
            uniforms = torch.stack([
                torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(
                    row_seed(seed, keys[i], k)), dtype=torch.float64)
                for i, k in batch_rows
            ]).float()  # fmt: skip
            out, ended = _generate_batch(
                model,
                [list(prompts[i]) for i, _ in batch_rows],
                uniforms,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                eos_ids=eos_ids,
                pad_token_id=pad,
                kv_cache=kv_cache,
                device=device,
                stop=stop,
                tokenizer=tokenizer,
            )
            for (i, k), ids, end in zip(batch_rows, out, ended, strict=True):
                completions[i][k], finished[i][k] = ids, end
            bar.update(len(batch_rows))
    finally:
        bar.close()
        model.train(was_training)

    texts = None
    if tokenizer is not None:
        texts = [[stop.text(ids, tokenizer) for ids in per_prompt] for per_prompt in completions]
    return Rollouts(completions, finished, texts)
