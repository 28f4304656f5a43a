"""Teacher-side context (a privileged teacher prompt over the same response tokens) and the
self-distillation student: the divergence is taken on exactly the response tokens of each
sequence, checked against a by-hand float64 computation on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama, tiny_paced_datamodule

from lrkd.data.tokens import pad_collate, prompt_response_example, response_token_ids, teacher_view
from lrkd.generation.on_policy import OnPolicy
from lrkd.models.lowrank import LowRankCloneBuilder
from lrkd.models.students import TeacherCopy
from lrkd.module import DistillationModule
from lrkd.objective import Loss

PAD = 3


def _rows() -> list[tuple[list[int], list[int], list[int]]]:
    """(student prompt, teacher prompt, response) per row: teacher prompts longer or shorter
    than the student's, responses of different lengths (so both sequences are padded)."""
    return [
        ([5, 6, 7], [40, 41, 42, 43, 44, 45, 5, 6, 7], [20, 21, 22, 23]),
        ([8, 9, 10, 11, 12], [50, 8], [30, 31]),
    ]


def _batch(weight: list[float] | None = None) -> dict[str, torch.Tensor]:
    examples = []
    for i, (s_prompt, t_prompt, response) in enumerate(_rows()):
        example = prompt_response_example(s_prompt, response)
        teacher = prompt_response_example(t_prompt, response)
        example.update({f"teacher_{k}": v for k, v in teacher.items()})
        if weight is not None:
            example["weight"] = torch.tensor(weight[i])
        examples.append(example)
    return pad_collate(examples, pad_token_id=PAD)


def _by_hand(student, teacher, kind: str, temperature: float, weight) -> torch.Tensor:
    """The divergence term in float64, one row at a time, unpadded: the student's distribution
    at each position that predicts a response token, against the teacher's at the position
    predicting the same token after the teacher's prompt."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i, (s_prompt, t_prompt, response) in enumerate(_rows()):
        s_ids = torch.tensor([s_prompt + response])
        t_ids = torch.tensor([t_prompt + response])
        s_logits = student(s_ids).logits[0].double() / temperature
        t_logits = teacher(t_ids).logits[0].double() / temperature
        # position j - 1 predicts token j; the response starts at len(prompt)
        s_pos = torch.arange(len(s_prompt) - 1, len(s_prompt) + len(response) - 1)
        t_pos = torch.arange(len(t_prompt) - 1, len(t_prompt) + len(response) - 1)
        log_q = F.log_softmax(s_logits[s_pos], dim=-1)
        log_p = F.log_softmax(t_logits[t_pos], dim=-1)
        if kind == "forward_kl":
            per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        else:  # reverse_kl
            per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
        total = total + (1.0 if weight is None else weight[i]) * per_token.sum()
        count += len(response)
    return total / count


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_divergence_is_taken_on_the_response_tokens_of_each_sequence(fused, kind) -> None:
    teacher = make_tiny_llama(seed=0)
    student = make_tiny_llama(seed=1, hidden_size=32, num_attention_heads=2)
    module = DistillationModule(
        teacher,
        student,
        fused_head=fused,
        teacher_dtype="float32",
        loss=Loss(divergence=kind, temperature=2.0),
    )
    module.train()
    weight = [0.5, 1.5]
    terms = module.distillation_loss(_batch(weight))
    with torch.no_grad():
        expected = _by_hand(module.student, module.teacher, kind, 2.0, weight)
    torch.testing.assert_close(terms["kd"].double(), expected, rtol=1e-5, atol=1e-7)
    terms["loss"].backward()
    assert all(p.grad is not None for p in module.student.parameters())


def test_fused_and_logits_paths_give_the_same_gradients_with_teacher_context() -> None:
    grads = []
    for fused in (False, True):
        teacher = make_tiny_llama(seed=0)
        student = make_tiny_llama(seed=1, hidden_size=32, num_attention_heads=2)
        module = DistillationModule(
            teacher, student, fused_head=fused, teacher_dtype="float32", loss=Loss(ce_weight=0.3)
        )
        module.train()
        module.distillation_loss(_batch())["loss"].backward()
        grads.append({n: p.grad for n, p in module.student.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_same_prompts_for_both_give_the_plain_step() -> None:
    """Teacher keys that repeat the student's sequence change nothing."""
    teacher = make_tiny_llama(seed=0)
    student = make_tiny_llama(seed=1, hidden_size=32, num_attention_heads=2)
    module = DistillationModule(teacher, student, teacher_dtype="float32", loss=Loss(ce_weight=0.3))
    module.eval()
    plain = {k: v for k, v in _batch().items() if not k.startswith("teacher_")}
    mirrored = {**plain, **{f"teacher_{k}": v for k, v in plain.items()}}
    a, b = module.distillation_loss(plain), module.distillation_loss(mirrored)
    for key in a:
        torch.testing.assert_close(b[key], a[key], msg=key)


def test_mismatched_responses_are_refused() -> None:
    module = DistillationModule(make_tiny_llama(seed=0), make_tiny_llama(seed=1),
                                teacher_dtype="float32")  # fmt: skip
    batch = _batch()
    batch["teacher_input_ids"] = batch["teacher_input_ids"].clone()
    batch["teacher_input_ids"][0, -1] = 99  # the last response token of row 0 (unpadded row)
    with pytest.raises(ValueError, match="same response tokens"):
        module.distillation_loss(batch)


def test_a_low_rank_clone_refuses_teacher_context() -> None:
    module = DistillationModule(make_tiny_llama(seed=0), LowRankCloneBuilder(hidden_size=32),
                                teacher_dtype="float32")  # fmt: skip
    with pytest.raises(ValueError, match="LowRankClone"):
        module.distillation_loss(_batch())


def test_on_policy_batch_gives_the_teacher_its_prompt_and_the_same_completions() -> None:
    module = DistillationModule(
        make_tiny_llama(seed=0),
        make_tiny_llama(seed=1),
        teacher_dtype="float32",
        on_policy=OnPolicy(fraction=1.0, max_new_tokens=5, eos_token_id=2),
    )
    batch = _batch()
    out = module.on_policy.batch(module.student, batch, step=0)
    student, teacher = out, teacher_view(out)
    for row, (s_prompt, t_prompt, _) in enumerate(_rows()):
        s_ids = student["input_ids"][row][student["attention_mask"][row].bool()].tolist()
        t_ids = teacher["input_ids"][row][teacher["attention_mask"][row].bool()].tolist()
        assert s_ids[: len(s_prompt)] == s_prompt and t_ids[: len(t_prompt)] == t_prompt
        assert s_ids[len(s_prompt) :] == t_ids[len(t_prompt) :]  # the same completion
    module.train()
    assert torch.isfinite(module.distillation_loss(out)["loss"])


def test_teacher_copy_starts_as_the_teacher_and_trains_alone() -> None:
    teacher = make_tiny_llama(seed=0)
    module = DistillationModule(teacher, TeacherCopy(), teacher_dtype="float32")
    student = module.student
    assert student is not module.teacher
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in module.teacher.parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(student(ids).logits, module.teacher(ids).logits, rtol=0, atol=0)
    batch = pad_collate([prompt_response_example([5, 6], [7, 8, 9])], pad_token_id=PAD)
    module.train()
    terms = module.distillation_loss(batch)
    assert float(terms["kd"]) == pytest.approx(0.0, abs=1e-6)  # same model, same prompt
    with torch.no_grad():
        next(student.parameters()).add_(0.1)
    assert not torch.equal(next(student.parameters()), next(module.teacher.parameters()))


def test_datamodule_builds_teacher_views_with_the_same_responses(tmp_path, tiny_teacher_dir):
    # The worked example ends with the EOS token's text, which must become its id.
    template = "Worked example: 1 + 1 = 2.</s>\nQ: {prompt} (answer {answer})\nA:"
    dm = tiny_paced_datamodule(
        tiny_teacher_dir, tmp_path / "cache", teacher_prompt_template=template,
        estimate_at_start=False,
    )  # fmt: skip
    dm.setup()
    for split in ("train", "val"):
        problems = dm.problems(split)
        answers = [response_token_ids(dm.tokenizer, f" {p.answer}") for p in problems]
        dm.set_responses(split, range(len(problems)), answers)
    dm.build_examples()
    example = dm.examples("train")[0]
    problem = dm.train_problems[0]
    teacher_prompt = example["teacher_input_ids"][example["teacher_loss_mask"] == 0]
    assert (teacher_prompt == dm.tokenizer.eos_token_id).sum() == 1
    text = dm.tokenizer.decode(teacher_prompt)
    assert (
        text == f"Worked example: 1 + 1 = 2.</s>\nQ: {problem.prompt} (answer {problem.answer})\nA:"
    )
    s_response = example["input_ids"][example["loss_mask"].bool()]
    t_response = example["teacher_input_ids"][example["teacher_loss_mask"].bool()]
    assert torch.equal(s_response, t_response) and len(s_response) > 0
    batch = next(iter(dm.train_dataloader()))
    assert {"teacher_input_ids", "teacher_attention_mask", "teacher_loss_mask"} <= batch.keys()


def test_datamodule_refuses_a_teacher_template_without_the_prompt(tmp_path, tiny_teacher_dir):
    with pytest.raises(ValueError, match="teacher_prompt_template"):
        tiny_paced_datamodule(tiny_teacher_dir, tmp_path, teacher_prompt_template="{answer}")
