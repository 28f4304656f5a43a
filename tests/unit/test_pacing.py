"""The PACED weight, buckets, cold start, normalisation, the sampler and pass-rate estimation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lrkd.data.pacing import (
    beta_kernel_weight,
    bucket_labels,
    bucketize,
    pacing_weights,
    pass_rates,
)
from lrkd.data.verifiers import FinalNumber
from lrkd.generation.pass_rates import count_correct

# ------------------------------------------------------------------------------- the weight


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (2.0, 1.0), (0.5, 3.0), (0.0, 1.0)])
def test_beta_kernel_matches_float64_formula(alpha: float, beta: float) -> None:
    p = torch.linspace(0, 1, 101, dtype=torch.float64)
    expected = torch.tensor([x**alpha * (1 - x) ** beta for x in p.tolist()], dtype=torch.float64)
    torch.testing.assert_close(beta_kernel_weight(p, alpha, beta), expected, rtol=1e-12, atol=0)


def test_default_kernel_is_p_one_minus_p_peaking_at_half() -> None:
    p = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    w = beta_kernel_weight(p)
    torch.testing.assert_close(
        w, torch.tensor([0.0, 0.1875, 0.25, 0.1875, 0.0], dtype=torch.float64)
    )
    assert int(w.argmax()) == 2


def test_kernel_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="alpha and beta"):
        beta_kernel_weight(torch.tensor([0.5]), alpha=-1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        beta_kernel_weight(torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        beta_kernel_weight(torch.tensor([float("nan")]))


def test_weighting_modes() -> None:
    correct = torch.tensor([0, 1, 2, 4])  # K = 4 -> p = 0, .25, .5, 1
    paced = pacing_weights(correct, 4, "paced")
    torch.testing.assert_close(
        paced.weight, torch.tensor([0, 0.1875, 0.25, 0], dtype=torch.float64)
    )
    assert not paced.cold_start
    hard = pacing_weights(correct, 4, "hard_filter")
    torch.testing.assert_close(hard.weight, torch.tensor([0, 1, 1, 0], dtype=torch.float64))
    uniform = pacing_weights(correct, 4, "uniform")
    torch.testing.assert_close(uniform.weight, torch.ones(4, dtype=torch.float64))
    skewed = pacing_weights(correct, 4, "paced", alpha=2.0, beta=0.5)
    torch.testing.assert_close(
        skewed.weight,
        torch.tensor([0, 0.0625 * 0.75**0.5, 0.25 * 0.5**0.5, 0], dtype=torch.float64),
    )


def test_pass_rates_and_count_validation() -> None:
    torch.testing.assert_close(
        pass_rates(torch.tensor([0, 3, 8]), 8), torch.tensor([0, 0.375, 1.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="correct counts"):
        pacing_weights(torch.tensor([9]), 8)
    with pytest.raises(ValueError, match="weighting"):
        pacing_weights(torch.tensor([1]), 8, "soft")
    with pytest.raises(ValueError, match="cold_start"):
        pacing_weights(torch.tensor([1]), 8, cold_start="warm")


# ------------------------------------------------------------------------------ cold start


def test_cold_start_uniform_when_the_student_solves_nothing() -> None:
    out = pacing_weights(torch.zeros(5, dtype=torch.long), 8, "paced")
    assert out.cold_start
    torch.testing.assert_close(out.weight, torch.ones(5, dtype=torch.float64))
    # ... and when it solves everything: no frontier either.
    assert pacing_weights(torch.full((5,), 8), 8, "hard_filter").cold_start


def test_cold_start_laplace_smooths_the_rate() -> None:
    correct = torch.tensor([0, 0, 8])
    out = pacing_weights(correct, 8, "paced", cold_start="laplace")
    assert out.cold_start
    smoothed = torch.tensor([1 / 10, 1 / 10, 9 / 10], dtype=torch.float64)
    torch.testing.assert_close(out.weight, smoothed * (1 - smoothed))
    assert bool((out.weight > 0).all())


def test_cold_start_error_and_min_frontier() -> None:
    with pytest.raises(RuntimeError, match="cold start"):
        pacing_weights(torch.zeros(3, dtype=torch.long), 4, cold_start="error")
    # One problem on the frontier is enough by default, not when min_frontier asks for two.
    correct = torch.tensor([0, 2, 4])
    assert not pacing_weights(correct, 4).cold_start
    assert pacing_weights(correct, 4, min_frontier=2).cold_start


# --------------------------------------------------------------------------------- buckets


def test_bucket_edges_and_labels() -> None:
    edges = [0.25, 0.5, 0.75]
    p = torch.tensor([0.0, 1e-9, 0.25, 0.2500001, 0.5, 0.74, 0.75, 0.76, 0.999, 1.0])
    assert bucketize(p, edges).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert bucket_labels(edges) == [
        "p=0",
        "(0,0.25]",
        "(0.25,0.5]",
        "(0.5,0.75]",
        "(0.75,1)",
        "p=1",
    ]
    assert bucketize(torch.tensor([0.0, 0.5, 1.0]), []).tolist() == [0, 1, 2]
    assert bucket_labels([]) == ["p=0", "(0,1)", "p=1"]
    assert bucketize(torch.tensor([0.1, 0.3]), [0.2]).tolist() == [1, 2]


@pytest.mark.parametrize("edges", [[0.0, 0.5], [0.5, 1.0], [0.5, 0.25], [0.3, 0.3], [-0.1]])
def test_bad_bucket_edges(edges: list[float]) -> None:
    with pytest.raises(ValueError, match="bucket edges"):
        bucketize(torch.tensor([0.5]), edges)


# ------------------------------------------------------------- pass rates from a fake model


class FixedSuccessLM(nn.Module):
    """A causal LM that answers problem i correctly ("1") with probability p_i, else "0".

    The problem is read off the prompt's characters; after the answer digit comes EOS. Logits
    are computed row by row, so they do not depend on the batch. No KV cache.
    """

    def __init__(self, tokenizer, success: dict[str, float]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.vocab = len(tokenizer)
        self.right = tokenizer.convert_tokens_to_ids("1")
        self.wrong = tokenizer.convert_tokens_to_ids("0")
        self.eos = tokenizer.eos_token_id
        self.prompts = {tuple(tokenizer(k, add_special_tokens=False)["input_ids"]): v
                        for k, v in success.items()}  # fmt: skip
        self.prompt_length = len(next(iter(self.prompts)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        batch, length = input_ids.shape
        logits = torch.full((batch, length, self.vocab), -1e9)
        for row in range(batch):
            if length == self.prompt_length:
                p = self.prompts[tuple(input_ids[row].tolist())]
                logits[row, -1, self.right] = math.log(p) if p > 0 else -1e9
                logits[row, -1, self.wrong] = math.log(1 - p) if p < 1 else -1e9
            else:
                logits[row, -1, self.eos] = 0.0
        return logits


def _binomial_interval(n: int, p: float, tail: float = 1e-4) -> tuple[int, int]:
    """The central interval of Binomial(n, p) holding all but ``2 * tail`` of the mass."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    low, mass = 0, 0.0
    while mass + pmf[low] < tail:
        mass += pmf[low]
        low += 1
    high, mass = n, 0.0
    while mass + pmf[high] < tail:
        mass += pmf[high]
        high -= 1
    return low, high


def _fake_problems(tokenizer, rates: list[float]):
    names = [f"P{i:03d}" for i in range(len(rates))]
    model = FixedSuccessLM(tokenizer, dict(zip(names, rates, strict=True)))
    prompts = [tokenizer(n, add_special_tokens=False)["input_ids"] for n in names]
    return model, prompts, names


def test_estimates_lie_inside_binomial_bounds(tiny_tokenizer) -> None:
    rates = [0.0, 0.05, 0.2, 0.5, 0.7, 0.95, 1.0]
    model, prompts, names = _fake_problems(tiny_tokenizer, rates)
    k = 200
    correct = count_correct(
        model, prompts, ["1"] * len(rates), names, FinalNumber(), tiny_tokenizer,
        num_samples=k, max_new_tokens=3, batch_size=64, seed=5,
    )  # fmt: skip
    assert correct[0] == 0 and correct[-1] == k  # certain outcomes are exact
    for c, p in zip(correct.tolist(), rates, strict=True):
        low, high = _binomial_interval(k, p)
        assert low <= c <= high, (p, c, (low, high))


def test_estimate_does_not_depend_on_batching_or_sharding(tiny_tokenizer) -> None:
    rates = [0.1, 0.3, 0.5, 0.6, 0.9]
    model, prompts, names = _fake_problems(tiny_tokenizer, rates)
    args = (model, prompts, ["1"] * 5, names, FinalNumber(), tiny_tokenizer)
    whole = count_correct(*args, num_samples=16, batch_size=7, seed=1, max_new_tokens=3)
    other_batching = count_correct(*args, num_samples=16, batch_size=80, seed=1, max_new_tokens=3)
    assert whole.tolist() == other_batching.tolist()

    # Two "ranks", each estimating its shard; the sum plays the all-reduce.
    shards = [
        count_correct(
            *args,
            num_samples=16,
            seed=1,
            max_new_tokens=3,
            rank=r,
            world_size=2,
            reduce_sum=lambda t: t,
        )
        for r in range(2)
    ]
    assert (shards[0] > 0).tolist() == [True, False, True, False, True]  # rank 0: problems 0, 2, 4
    assert (shards[0] + shards[1]).tolist() == whole.tolist()
    other_seed = count_correct(*args, num_samples=16, seed=2, max_new_tokens=3)
    assert other_seed.tolist() != whole.tolist()


def test_count_correct_argument_checks(tiny_tokenizer) -> None:
    model, prompts, names = _fake_problems(tiny_tokenizer, [0.5, 0.5])
    with pytest.raises(ValueError, match="prompts"):
        count_correct(model, prompts, ["1"], names, FinalNumber(), tiny_tokenizer, num_samples=2)
    with pytest.raises(ValueError, match="reduce_sum"):
        count_correct(model, prompts, ["1", "1"], names, FinalNumber(), tiny_tokenizer,
                      num_samples=2, world_size=2)  # fmt: skip


class RamblingLM(nn.Module):
    """Greedy: always answers "12", then starts another question: "12\nQ: 3"."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        ids = tokenizer.convert_tokens_to_ids
        text = "=12\nQ: 3"
        self.table = torch.full((128, 128), -1e4)
        for a, b in itertools.pairwise(text):
            self.table[ids(a), ids(b)] = 0.0

    def forward(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        return self.table[input_ids] + self.anchor


def test_stop_strings_keep_the_verifier_on_the_answer(tiny_tokenizer) -> None:
    """Without a stop string the final-number verifier reads the 3 of the next question the
    model starts writing; with ``stop=["\\nQ:"]`` it reads the answer 12."""
    model = RamblingLM(tiny_tokenizer).eval()
    args = (model, [tiny_tokenizer("x=", add_special_tokens=False)["input_ids"]], ["12"], ["p"],
            FinalNumber(), tiny_tokenizer)  # fmt: skip
    kwargs = dict(num_samples=1, temperature=0.0, max_new_tokens=8)
    assert count_correct(*args, **kwargs).tolist() == [0]
    assert count_correct(*args, stop=["\nQ:"], **kwargs).tolist() == [1]
