"""On-policy steps: prompts from the batch, the student's own completions, masks, and the loss
against a float64 reverse KL computed by hand on the same tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from lrkd.generation.on_policy import OnPolicy, batch_prompts
from lrkd.generation.sampling import generation_model
from lrkd.models.lowrank import LowRankClone, LowRankCloneBuilder
from lrkd.module import DistillationModule
from lrkd.objective import Loss

EOS_IDS = list(range(4, 16))  # many end tokens: some rows end early, some run to the limit
PAD = 3
MAX_NEW = 6


def _prompt_response_batch() -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Rows of prompt + teacher response, right-padded, with PACED weights."""
    g = torch.Generator().manual_seed(0)
    lengths = [(5, 4), (3, 6), (7, 2), (4, 3)]  # (prompt, response)
    width = max(p + r for p, r in lengths)
    input_ids = torch.full((len(lengths), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros_like(input_ids)
    prompts = []
    for row, (p, r) in enumerate(lengths):
        ids = torch.randint(40, 120, (p + r,), generator=g)
        input_ids[row, : p + r] = ids
        attention_mask[row, : p + r] = 1
        loss_mask[row, p : p + r] = 1
        prompts.append(ids[:p].tolist())
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "weight": torch.tensor([1.0, 0.5, 2.0, 0.25]),
        "problem_index": torch.tensor([7, 3, 11, 0]),
    }
    return batch, prompts


def _module(**kwargs) -> DistillationModule:
    student = kwargs.pop("student", None) or make_tiny_llama(
        seed=1, hidden_size=32, num_attention_heads=2
    )
    defaults = dict(
        loss=Loss(divergence="reverse_kl"),
        on_policy=OnPolicy(fraction=1.0, max_new_tokens=MAX_NEW, eos_token_id=EOS_IDS),
    )
    return DistillationModule(make_tiny_llama(seed=0), student, **{**defaults, **kwargs})


def test_batch_prompts_right_and_left_padding() -> None:
    batch, prompts = _prompt_response_batch()
    assert batch_prompts(batch) == prompts
    # The same rows left-padded: padding before the prompt is not part of it.
    left = {k: v.clone() for k, v in batch.items()}
    for row in range(left["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        for key in ("input_ids", "attention_mask", "loss_mask"):
            left[key][row] = torch.roll(batch[key][row], left[key].shape[1] - n)
    assert int(left["attention_mask"][3, 0]) == 0  # row 3 is shorter than the batch
    assert batch_prompts(left) == prompts


def test_batch_prompts_refuses_packed_text() -> None:
    ids = torch.randint(4, 100, (2, 8))
    packed = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "loss_mask": torch.ones_like(ids),
    }
    with pytest.raises(
        ValueError, match=r"rows \[0, 1\] have no prompt tokens.*prompt \+ response"
    ):
        batch_prompts(packed)


def test_on_policy_batch_masks_exactly_the_generated_tokens() -> None:
    torch.manual_seed(0)
    module = _module()
    batch, prompts = _prompt_response_batch()
    out = module.on_policy.batch(module.student, batch, 0, 0)
    assert out["weight"].tolist() == batch["weight"].tolist()
    assert out["problem_index"].tolist() == batch["problem_index"].tolist()
    ended_early = truncated = 0
    for row, prompt in enumerate(prompts):
        ids = out["input_ids"][row]
        attended = out["attention_mask"][row].bool()
        targets = out["loss_mask"][row].bool()
        n = int(attended.sum())
        assert attended[:n].all() and not attended[n:].any()  # right padding only
        assert ids[: len(prompt)].tolist() == prompt
        completion = ids[len(prompt) : n].tolist()
        # Targets: exactly the generated tokens, not the prompt, not the padding.
        assert targets.nonzero().squeeze(-1).tolist() == list(range(len(prompt), n))
        assert (ids[n:] == PAD).all()
        if completion[-1] in EOS_IDS:
            ended_early += len(completion) < MAX_NEW
            assert all(t not in EOS_IDS for t in completion[:-1])  # cut right after the EOS
        else:
            truncated += 1
            assert len(completion) == MAX_NEW
    assert ended_early and truncated  # both cases are exercised
    # The same step on a second call samples the same tokens (seeded by step and problem).
    again = module.on_policy.batch(module.student, batch, 0, 0)
    assert torch.equal(again["input_ids"], out["input_ids"])
    other = module.on_policy.batch(module.student, batch, 0, 1)
    assert not torch.equal(other["input_ids"], out["input_ids"])


def _reverse_kl_reference(module: DistillationModule, batch: dict[str, torch.Tensor]):
    """Weighted reverse KL(student || teacher) in float64, by hand, on the batch's targets."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        log_p = torch.log_softmax(
            module.teacher(input_ids=ids, attention_mask=attn).logits.double(), -1
        )
    log_q = torch.log_softmax(
        module.student(input_ids=ids, attention_mask=attn).logits.double(), -1
    )
    # Position t predicts token t + 1, which counts when it is a (generated) target.
    mask = (batch["loss_mask"][:, 1:] * attn[:, 1:]).double()
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)[:, :-1] * mask
    return (rkl.sum(-1) * batch["weight"].double()).sum() / mask.sum()


def test_on_policy_loss_is_reverse_kl_on_generated_tokens_and_teacher_gets_no_gradient() -> None:
    torch.manual_seed(0)
    module = _module()
    batch, _ = _prompt_response_batch()
    out = module.on_policy.batch(module.student, batch, 0, 0)
    assert not out["input_ids"].requires_grad

    terms = module.distillation_loss(out)
    terms["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters()}
    assert any(g.abs().sum() > 0 for g in grads.values())

    module.student.zero_grad(set_to_none=True)
    reference = _reverse_kl_reference(module, out)
    torch.testing.assert_close(terms["kd"].double(), reference, rtol=1e-5, atol=1e-7)
    # Same gradient as the float64 formula differentiated through the student's scoring
    # forward alone: no other path (sampling, teacher) contributes.
    reference.backward()
    for name, param in module.student.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_training_step_uses_on_policy_batch() -> None:
    """Through training_step: the loss is the on-policy batch's, not the data's."""
    torch.manual_seed(0)
    module = _module()
    batch, _ = _prompt_response_batch()
    on_policy = module.distillation_loss(module.on_policy.batch(module.student, batch, 0, 0))[
        "loss"
    ]
    data = module.distillation_loss(batch)["loss"]
    step = module.training_step(batch, 0)
    torch.testing.assert_close(step, on_policy)
    assert not torch.allclose(step, data)


def test_on_policy_fraction_share_and_determinism() -> None:
    never = _module(on_policy=OnPolicy(fraction=0.0))
    always = _module(on_policy=OnPolicy(fraction=1.0))
    mixed = _module(on_policy=OnPolicy(fraction=0.3))
    assert not any(never.on_policy.is_on_policy(0, i) for i in range(100))
    assert all(always.on_policy.is_on_policy(0, i) for i in range(100))
    draws = [mixed.on_policy.is_on_policy(0, i) for i in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    again = _module(on_policy=OnPolicy(fraction=0.3))
    assert draws == [again.on_policy.is_on_policy(0, i) for i in range(4000)]


def test_low_rank_clone_student_rolls_out_through_a_reused_plain_model() -> None:
    torch.manual_seed(0)
    teacher = make_tiny_llama(seed=0, tie_word_embeddings=False)
    module = DistillationModule(
        teacher,
        LowRankCloneBuilder(hidden_size=32, init="normal", seed=0),
        loss=Loss(divergence="reverse_kl"),
        on_policy=OnPolicy(fraction=1.0, max_new_tokens=MAX_NEW, eos_token_id=EOS_IDS),
    )
    assert isinstance(module.student, LowRankClone)
    batch, _ = _prompt_response_batch()
    module.on_policy.batch(module.student, batch, 0, 0)
    rollout_model = module.on_policy.rollout_model
    assert rollout_model is not None
    assert "_rollout_model" not in dict(module.named_modules())  # not a submodule
    assert not any(k.startswith("_rollout") for k in module.state_dict())
    with torch.no_grad():  # the student changes, as after an optimizer step
        for p in module.student.all_projections():
            p.add_(0.05 * torch.randn_like(p))
    module.on_policy.batch(module.student, batch, 0, 0)
    assert module.on_policy.rollout_model is rollout_model  # refilled in place, not rebuilt
    fresh = generation_model(module.student)
    ids = batch["input_ids"]
    torch.testing.assert_close(
        rollout_model(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=0, atol=0
    )


def test_missing_eos_fails_clearly() -> None:
    module = DistillationModule(
        make_tiny_llama(seed=0, eos_token_id=None),
        make_tiny_llama(seed=1, hidden_size=32, num_attention_heads=2, eos_token_id=None),
        on_policy=OnPolicy(fraction=1.0),
    )
    batch, _ = _prompt_response_batch()
    with pytest.raises(ValueError, match=r"model\.on_policy\.eos_token_id"):
        module.on_policy.batch(module.student, batch, 0, 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("fraction", 1.5), ("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0)],
)
def test_on_policy_settings_are_checked(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"model\.on_policy\.{field}"):
        _module(on_policy=OnPolicy(**{field: value}))
