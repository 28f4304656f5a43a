"""DistillationModule: frozen teacher, loss vs a float64 reference, checkpoints, vocab checks."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_llama
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule
from lrkd.objective import Loss


def _batch(seed: int = 0, batch: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 100, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding in example 1
    loss_mask = torch.zeros_like(input_ids)
    loss_mask[0, 4:] = 1
    loss_mask[1, 5:-3] = 1
    loss_mask[2, 1:] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "weight": torch.tensor([1.0, 0.5, 2.0]),
    }


def _module(**kwargs) -> DistillationModule:
    teacher = make_tiny_llama(seed=0)
    student = kwargs.pop("student", None) or make_tiny_llama(
        seed=1, hidden_size=32, num_attention_heads=2
    )
    return DistillationModule(teacher=teacher, student=student, **kwargs)


def _reference_loss(module: DistillationModule, batch: dict[str, torch.Tensor], temperature: float):
    """Weighted forward KL + CE by hand in float64, from the two models' logits."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t = module.teacher(input_ids=ids, attention_mask=attn).logits.double()[:, :-1]
    s = module.student(input_ids=ids, attention_mask=attn).logits.double()[:, :-1]
    mask = (batch["loss_mask"][:, 1:] * attn[:, 1:]).double()
    log_p = torch.log_softmax(t / temperature, -1)
    log_q = torch.log_softmax(s / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * mask
    kd = (kl.sum(-1) * batch["weight"].double()).sum() / mask.sum()
    nll = -torch.log_softmax(s, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ce = (nll * mask).sum() / mask.sum()
    return kd, ce


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_matches_float64_reference(temperature: float) -> None:
    module = _module(loss=Loss(temperature=temperature, ce_weight=0.3))
    batch = _batch()
    terms = module.distillation_loss(batch)
    kd_ref, ce_ref = _reference_loss(module, batch, temperature)
    torch.testing.assert_close(terms["kd"].double(), kd_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["ce"].double(), ce_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["loss"].double(), kd_ref + 0.3 * ce_ref, rtol=1e-5, atol=1e-7)

    terms["loss"].backward()
    student_grads = [p.grad for p in module.student.parameters()]
    assert all(g is not None for g in student_grads)
    assert all(p.grad is None for p in module.teacher.parameters())
    module.student.zero_grad()
    (kd_ref + 0.3 * ce_ref).backward()
    for p, g in zip(module.student.parameters(), student_grads, strict=True):
        torch.testing.assert_close(g, p.grad.to(g.dtype), rtol=1e-4, atol=1e-7)


def test_teacher_frozen_eval_and_outside_optimizer() -> None:
    module = _module()
    module.train()
    assert module.student.training
    assert not module.teacher.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.student.parameters()}
    assert not in_optimizer & {id(p) for p in module.teacher.parameters()}


def test_student_builder_receives_teacher() -> None:
    module = DistillationModule(
        teacher=make_tiny_llama(seed=0),
        student=FromTeacherConfig(hidden_size=32, num_hidden_layers=1),
    )
    config = module.student.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 1, TINY_VOCAB)
    # head_dim 16 as in the teacher (64 / 4), KV ratio 2 kept, FFN width scaled by 32/64.
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert config.intermediate_size == 64


def test_checkpoint_excludes_teacher_and_resumes(tmp_path) -> None:
    module = _module()
    batches = [_batch(seed) for seed in range(4)]
    trainer = Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert not module.teacher.training
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and all(k.startswith("student.") for k in state)

    fresh = _module()
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"], strict=False)
    checkpoint = torch.load(path, weights_only=False)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for (name, a), b in zip(
        module.student.state_dict().items(), fresh.student.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_fit_reduces_loss() -> None:
    torch.manual_seed(0)
    module = _module(optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    batch = _batch(0)
    before = module.distillation_loss(batch)["loss"].item()
    trainer = Trainer(
        max_steps=30, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader([batch] * 30, batch_size=None))
    after = module.distillation_loss(batch)["loss"].item()
    assert after < 0.5 * before, (before, after)


def test_unknown_divergence_names_field() -> None:
    with pytest.raises(ValueError, match=r"model\.loss\.divergence='kl'.*forward_kl"):
        _module(loss=Loss(divergence="kl"))


def test_missing_teacher_path_names_field() -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.teacher='\./no/such/teacher'"):
        DistillationModule(teacher="./no/such/teacher", student=make_tiny_llama(seed=1))


def test_vocab_mismatch_fails_clearly() -> None:
    student = make_tiny_llama(seed=1, vocab_size=64)
    with pytest.raises(ValueError, match=r"Vocab mismatch.*teacher predicts 128.*student 64"):
        _module(student=student)


def test_padded_vocab_uses_shared_rows(caplog) -> None:
    student = make_tiny_llama(seed=1, vocab_size=TINY_VOCAB + 16)
    with caplog.at_level(logging.WARNING, logger="lrkd"):
        module = _module(student=student, loss=Loss(vocab_size=101))
    assert module.objective.shared_vocab == TINY_VOCAB
    assert "padding" in caplog.text
    terms = module.distillation_loss(_batch())
    assert torch.isfinite(terms["loss"])


@pytest.mark.parametrize("kind", ["plain", "lrc"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(kind: str) -> None:
    from lrkd.models.lowrank import LowRankCloneBuilder

    results = []
    for checkpointing in (False, True):
        if kind == "lrc":
            student = LowRankCloneBuilder(hidden_size=32, init_std=0.1, cache_weights=False)
        else:
            student = FromTeacherConfig(hidden_size=32, num_hidden_layers=2, seed=0)
        module = _module(
            student=student,
            activation_checkpointing=checkpointing,
            loss=Loss(clone_weight=0.5 if kind == "lrc" else 0.0, ce_weight=0.3),
        )
        module.train()
        recomputed = []
        if checkpointing:  # count recomputations: the layers really run again in backward
            layers = module.student.layers if kind == "lrc" else module.student.model.layers
            for layer in layers:
                layer.mlp.register_forward_pre_hook(lambda *_, seen=recomputed: seen.append(1))
        loss = module.distillation_loss(_batch(4))["loss"]
        forwards = len(recomputed)
        loss.backward()
        if checkpointing:
            assert forwards == 2 and len(recomputed) == 4, (forwards, len(recomputed))
        grads = {n: p.grad for n, p in module.student.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_needs_a_checkpointable_student() -> None:
    class Bare(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return torch.zeros(*input_ids.shape, TINY_VOCAB)

    with pytest.raises(ValueError, match="activation_checkpointing"):
        _module(student=Bare(), activation_checkpointing=True)


@pytest.mark.parametrize("kind", ["plain", "lrc", "padded_vocab"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_head_step_equals_the_logits_step(kind: str, divergence: str) -> None:
    """``fused_head``: the training loss terms and the student's gradients equal the logits
    path's (weights, padding, temperature 2, clone terms, a padded student vocabulary)."""
    from lrkd.models.lowrank import LowRankCloneBuilder

    results = []
    for fused in (False, True):
        loss = Loss(divergence=divergence, temperature=2.0, ce_weight=0.3)
        if kind == "lrc":
            student = LowRankCloneBuilder(hidden_size=32, init_std=0.1, cache_weights=True)
            loss = replace(loss, clone_weight=0.5)
        elif kind == "padded_vocab":
            student = make_tiny_llama(seed=1, hidden_size=32, num_attention_heads=2,
                                      vocab_size=TINY_VOCAB + 8)  # fmt: skip
            loss = replace(loss, vocab_size=TINY_VOCAB)
        else:
            student = FromTeacherConfig(hidden_size=32, num_hidden_layers=2, seed=0)
        module = _module(
            student=student,
            fused_head=fused,
            loss=loss,
        )
        module.train()
        terms = module.distillation_loss(_batch(5))
        terms["loss"].backward()
        module.on_before_optimizer_step(None)
        assert module.uses_fused_head() is fused
        grads = {n: p.grad for n, p in module.student.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        results.append(({k: v.detach() for k, v in terms.items()}, grads))
    (terms_a, grads_a), (terms_b, grads_b) = results
    assert terms_a.keys() == terms_b.keys()
    for key, value in terms_a.items():
        torch.testing.assert_close(terms_b[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_head_is_off_in_evaluation_and_on_cpu_by_default() -> None:
    module = _module(student=FromTeacherConfig(hidden_size=32, num_hidden_layers=1))
    module.train()
    assert module.fused_head is None and not module.uses_fused_head()  # CPU: the logits path
    module.fused_head = True
    assert module.uses_fused_head()
    module.eval()
    assert not module.uses_fused_head()


def test_fused_head_refuses_a_student_without_hidden_states() -> None:
    class Bare(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return torch.zeros(*input_ids.shape, TINY_VOCAB)

    module = _module(student=Bare(), fused_head=True)
    module.train()
    with pytest.raises(ValueError, match="fused_head"):
        module.distillation_loss(_batch(0))


def test_setting_blocks_are_saved_as_plain_values_and_load_back(tmp_path, tiny_teacher_dir) -> None:
    """A module built in Python saves ``loss`` and ``on_policy`` as plain dicts, so its
    checkpoint loads with ``torch.load(weights_only=True)`` (Lightning's default) into the same
    settings."""
    from dataclasses import asdict

    import lightning

    from lrkd.generation.on_policy import OnPolicy

    loss = Loss(divergence="jsd", jsd_beta=0.3, ce_weight=0.25)
    on_policy = OnPolicy(fraction=0.5, max_new_tokens=7, eos_token_id=[2, 3])
    module = DistillationModule(
        str(tiny_teacher_dir), make_tiny_llama(seed=1), teacher_dtype="float32", loss=loss,
        on_policy=on_policy,
    )  # fmt: skip
    assert module.hparams["loss"] == asdict(loss)
    assert module.hparams["on_policy"] == asdict(on_policy)
    path = tmp_path / "module.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)  # fmt: skip
    loaded = DistillationModule.load_from_checkpoint(path, student=make_tiny_llama(seed=1))
    assert loaded.objective.divergence.kind == "jsd" and loaded.objective.divergence.beta == 0.3
    assert loaded.objective.ce_weight == 0.25
    assert (loaded.on_policy.fraction, loaded.on_policy.max_new_tokens) == (0.5, 7)
    assert loaded.on_policy.eos_token_ids == [2, 3]
    for key, value in module.student.state_dict().items():
        torch.testing.assert_close(loaded.student.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (Loss(kd_weight=-1.0), r"model\.loss\.kd_weight=-1\.0: a negative weight would maximise"),
        (Loss(ce_weight=-0.5, clone_weight=-2.0), r"ce_weight=-0\.5, clone_weight=-2\.0"),
        (Loss(kd_weight=0.0), r"kd_weight, ce_weight and clone_weight are all 0"),
    ],
)
def test_loss_weights_must_be_non_negative_and_not_all_zero(loss: Loss, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _module(loss=loss)


def test_an_invalid_optimizer_setting_names_the_field() -> None:
    module = _module(optimizer=lambda params: torch.optim.AdamW(params, lr=-0.001))
    with pytest.raises(ValueError, match=r"model\.optimizer: Invalid learning rate: -0\.001"):
        module.configure_optimizers()
