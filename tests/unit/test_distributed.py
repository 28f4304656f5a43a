"""Sharding helpers: the units lrkd picks, FSDP1's layer policy, and FSDP2 on a one-process
group (gathered copies and a sharded LowRankClone equal their unsharded selves exactly)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_llama
from torch import nn

from lrkd._compat import fsdp1_kwargs, model_parallel_sizes
from lrkd.distributed import (
    FSDP2Strategy,
    LayerWiseFSDPStrategy,
    decoder_layers,
    gathered_copy,
    is_sharded,
    layer_classes,
    local_numel,
    shard_fsdp2,
)
from lrkd.models.lowrank import LowRankClone
from lrkd.models.students import FromTeacherConfig
from lrkd.models.teachers import freeze


def test_decoder_layers_of_hf_and_custom_models() -> None:
    teacher = make_tiny_llama()
    layers = decoder_layers(teacher)
    assert layers == list(teacher.model.layers) and len(layers) == 2

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.ModuleList([nn.Linear(2, 2)])
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    custom = Custom()
    assert decoder_layers(custom) == list(custom.blocks)


class _Module(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher, self.student = teacher, student


def test_fsdp1_wraps_every_decoder_layer_and_refuses_a_clone(monkeypatch) -> None:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    captured = {}
    monkeypatch.setattr(
        "lightning.pytorch.strategies.FSDPStrategy.setup",
        lambda self, trainer: captured.update(fsdp1_kwargs(self)),
    )
    teacher = make_tiny_llama()
    student = FromTeacherConfig(hidden_size=32, num_hidden_layers=1)(teacher)
    assert {c.__name__ for c in layer_classes(teacher, student)} == {"LlamaDecoderLayer"}
    strategy = LayerWiseFSDPStrategy()
    strategy.connect(_Module(student, teacher))
    strategy.setup(None)
    assert isinstance(captured["auto_wrap_policy"], ModuleWrapPolicy)
    assert captured["use_orig_params"]
    strategy = LayerWiseFSDPStrategy()
    strategy.connect(_Module(LowRankClone(teacher, 32), teacher))
    with pytest.raises(ValueError, match="FSDP2Strategy"):
        strategy.setup(None)


def test_shard_refuses_a_teacher_that_is_not_frozen(one_process_mesh) -> None:
    teacher = make_tiny_llama()
    with pytest.raises(ValueError, match="frozen"):
        shard_fsdp2(teacher, FromTeacherConfig(hidden_size=32)(teacher), one_process_mesh)


def test_fsdp2_strategy_uses_every_rank_for_data_parallel() -> None:
    strategy = FSDP2Strategy()
    assert model_parallel_sizes(strategy) == ("auto", 1)


@pytest.fixture()
def one_process_mesh(tmp_path):
    """A one-process gloo group and its mesh (torn down after the test)."""
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_gathered_copy_of_a_sharded_teacher_is_the_teacher(one_process_mesh) -> None:
    teacher = freeze(make_tiny_llama(seed=0))
    reference = copy.deepcopy(teacher)
    student = FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0)(teacher)
    shard_fsdp2(teacher, student, one_process_mesh)
    assert is_sharded(teacher) and is_sharded(student)
    assert local_numel(teacher) == sum(p.numel() for p in reference.parameters())
    copy_ = gathered_copy(teacher)
    assert not is_sharded(copy_) and type(copy_).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(copy_(ids).logits, reference(ids).logits, rtol=0, atol=0)
    with torch.no_grad():  # refilled in place from changed weights
        for p in teacher.parameters():
            p.mul_(0.5)
    again = gathered_copy(teacher, into=copy_)
    assert again is copy_
    torch.testing.assert_close(
        copy_.model.norm.weight, reference.model.norm.weight * 0.5, rtol=0, atol=0
    )


def test_sharded_clone_computes_what_the_unsharded_clone_does(one_process_mesh) -> None:
    teacher = freeze(make_tiny_llama(seed=0, tie_word_embeddings=False))
    plain = LowRankClone(copy.deepcopy(teacher), 32, init_std=0.1, seed=3)
    clone = LowRankClone(teacher, 32, init_std=0.1, seed=3)
    shard_fsdp2(teacher, clone, one_process_mesh)
    assert is_sharded(teacher) and is_sharded(clone)
    # The clone's state holds its own tensors only, under the same names as unsharded.
    assert clone.state_dict().keys() == plain.state_dict().keys()
    assert local_numel(clone, trainable=True) == local_numel(plain, trainable=True)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2], [1, 7, 8, 9, 3, 3]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    out, ref = clone(ids, mask, with_teacher=True), plain(ids, mask, with_teacher=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.teacher_logits, ref.teacher_logits, rtol=0, atol=0)
    for name, value in ref.clone_losses.items():
        torch.testing.assert_close(out.clone_losses[name], value, rtol=1e-6, atol=0)
    (out.logits.logsumexp(-1).mean() + sum(out.clone_losses.values())).backward()
    (ref.logits.logsumexp(-1).mean() + sum(ref.clone_losses.values())).backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    for name, p in clone.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.full_tensor(), grads[name], rtol=1e-5, atol=1e-7)
    exported, expected = clone.materialize().state_dict(), plain.materialize().state_dict()
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
