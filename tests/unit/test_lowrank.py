"""LowRankClone: parity with the exported plain model, gradients, clone loss, errors.

References: the exported (materialised) transformers model run by transformers itself, the
teacher's own forward, hooks on full forwards for the clone loss, and autograd through an
uncached weight generation for the cached path's gradients.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, frozen_with_random_gains, make_tiny_llama, tiny_config_fields

from lrkd.data.probe import probe_batch
from lrkd.models.lowrank import CLONE_TERMS, LowRankClone, LowRankCloneBuilder
from lrkd.models.teachers import load_teacher, load_tokenizer
from lrkd.objective import Loss


def _common(**overrides):
    # Llama's tiny fields with an FFN width that differs from 2 x hidden.
    return tiny_config_fields(**{"intermediate_size": 96, **overrides})


def make_teacher(family: str, tied: bool = True, seed: int = 0) -> torch.nn.Module:
    """A tiny random teacher of ``family`` with non-trivial norm gains (and biases)."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_common(tie_word_embeddings=tied)))
    elif family == "mistral":  # sliding window shorter than the test sequences
        config = tf.MistralConfig(**_common(tie_word_embeddings=tied, sliding_window=8))
        model = tf.MistralForCausalLM(config)
    elif family == "qwen2":  # q/k/v biases; one full and one sliding-window layer
        config = tf.Qwen2Config(
            **_common(tie_word_embeddings=tied, use_sliding_window=True, sliding_window=8),
            max_window_layers=1,
        )
        model = tf.Qwen2ForCausalLM(config)
    elif family == "qwen3":  # q/k norms, head_dim not hidden/heads
        config = tf.Qwen3Config(**_common(tie_word_embeddings=tied, head_dim=24))
        model = tf.Qwen3ForCausalLM(config)
    else:
        raise ValueError(family)
    return frozen_with_random_gains(model)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def _batch(seed: int = 0, length: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, TINY_VOCAB, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    return ids, mask


def _max_rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return ((a - b)[keep].abs().max() / b[keep].abs().max()).item()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_clone_matches_exported_model_and_teacher(family: str, tied: bool) -> None:
    teacher = make_teacher(family, tied)
    clone = LowRankClone(teacher, hidden_size=40, init="normal", init_std=0.2, seed=1)
    ids, mask = _batch()
    with torch.no_grad():
        out = clone(ids, mask, with_teacher=True)
        exported = clone.materialize()
        ref = exported(input_ids=ids, attention_mask=mask).logits
        ref_teacher = teacher(input_ids=ids, attention_mask=mask).logits
    assert type(exported).__name__ == type(teacher).__name__
    assert exported.config.hidden_size == 40
    assert exported.config.head_dim == teacher.model.layers[0].self_attn.head_dim
    assert exported.config.num_hidden_layers == teacher.config.num_hidden_layers
    assert exported.config.intermediate_size == teacher.config.intermediate_size
    assert _max_rel_err(out.logits, ref, mask) <= 1e-4
    assert _max_rel_err(out.teacher_logits, ref_teacher, mask) <= 1e-5
    assert set(out.clone_losses) == set(CLONE_TERMS)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_exported_model(family: str) -> None:
    teacher = make_teacher(family, tied=family != "qwen2")
    clone = LowRankClone(teacher, hidden_size=32, init="normal", init_std=0.3, seed=2)
    exported = clone.materialize()
    prompt = torch.tensor([[1, 40, 50, 60, 70, 41]])
    ids = prompt
    with torch.no_grad():
        for _ in range(12):  # greedy, full recompute: the plain reference loop
            next_id = clone(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        generated = exported.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=3,
        )
    assert torch.equal(ids, generated)


def _hooked_activations(model: torch.nn.Module, ids, mask) -> dict[str, torch.Tensor]:
    taps = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "attn_out": "self_attn.o_proj",
        "ffn_out": "mlp.down_proj",
    }
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for term, path in taps.items():
            module = layer.get_submodule(path)
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, o, key=f"{i}.{term}": out.__setitem__(key, o.detach())
                )
            )
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_clone_loss_matches_full_forward_reference(family: str) -> None:
    """Per term: sum over layers of the masked MSE between the exported student's and the
    teacher's activations (hidden-space outputs mapped by the same projection)."""
    teacher = make_teacher(family)
    clone = LowRankClone(teacher, hidden_size=48, init_std=0.1, seed=3)
    ids, mask = _batch(1)
    with torch.no_grad():
        out = clone(ids, mask, with_teacher=True)
    s_act = _hooked_activations(clone.materialize(), ids, mask)
    t_act = _hooked_activations(teacher, ids, mask)
    keep = mask.bool()
    for term in CLONE_TERMS:
        expected = 0.0
        for i in range(teacher.config.num_hidden_layers):
            target = t_act[f"{i}.{term}"].double()
            if term in ("attn_out", "ffn_out"):
                key = {"attn_out": "o", "ffn_out": "down"}[term]
                target = target @ clone.projections[i][key].double()
            diff = s_act[f"{i}.{term}"].double() - target
            expected += diff[keep].pow(2).mean().item()
        torch.testing.assert_close(out.clone_losses[term].item(), expected, rtol=1e-4, atol=0)


def test_relative_clone_loss_and_term_selection() -> None:
    teacher = make_teacher("llama")
    ids, mask = _batch(2)
    plain = LowRankClone(teacher, 32, clone_terms=["gate", "ffn_out"], seed=0)
    relative = LowRankClone(teacher, 32, clone_terms=["gate"], clone_loss="relative_mse", seed=0)
    with torch.no_grad():
        a = plain(ids, mask, with_teacher=True).clone_losses
        b = relative(ids, mask, with_teacher=True).clone_losses
        t_gate = _hooked_activations(teacher, ids, mask)
    assert set(a) == {"gate", "ffn_out"} and set(b) == {"gate"}
    keep = mask.bool()
    expected = 0.0
    s_gate = _hooked_activations(relative.materialize(), ids, mask)
    for i in range(2):
        t = t_gate[f"{i}.gate"].double()[keep]
        s = s_gate[f"{i}.gate"].double()[keep]
        expected += ((s - t).pow(2).mean() / t.pow(2).mean()).item()
    torch.testing.assert_close(b["gate"].item(), expected, rtol=1e-4, atol=0)


def test_only_projections_and_norms_train_and_teacher_is_untouched() -> None:
    teacher = make_teacher("qwen3")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    clone = LowRankClone(teacher, hidden_size=32, seed=0)
    trainable = {n for n, p in clone.named_parameters() if p.requires_grad}
    for name in trainable:
        assert (
            ".projections." in name
            or name in ("embed_projection", "head_projection")
            or ("norm" in name)
        ), name
    # One copy of the teacher: the clone's own state is projections and norm gains only.
    n_proj = 2 * 7 * 64 * 32 + 64 * 32
    n_norm = 2 * 2 * 32 + 32 + 2 * 2 * 24  # layer norms, final norm, q/k norms (head_dim 24)
    assert sum(t.numel() for t in clone.state_dict().values()) == n_proj + n_norm
    optimizer = torch.optim.AdamW(clone.parameters(), lr=1e-2)
    ids, mask = _batch(3)
    for _ in range(3):
        out = clone(ids, mask, with_teacher=True)
        loss = out.logits.float().logsumexp(-1).mean() + sum(out.clone_losses.values())
        loss.backward()
        assert all(p.grad is not None for p in clone.parameters())
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_qwen2_biases_are_the_teachers_tensors() -> None:
    teacher = make_teacher("qwen2", tied=False)
    clone = LowRankClone(teacher, hidden_size=32)
    clone(torch.tensor([[5, 6, 7]]))
    q_bias = clone.layers[0].self_attn.q_proj.bias
    assert q_bias.data_ptr() == teacher.model.layers[0].self_attn.q_proj.bias.data_ptr()
    # ... used, never registered: the clone's state_dict keeps its own tensors only
    assert not any(name.endswith("bias") for name in clone.state_dict())
    fresh = LowRankClone(teacher, hidden_size=32)
    fresh.load_state_dict(clone.state_dict())  # strict


def test_a_clone_of_a_meta_teacher_is_built_on_the_meta_device() -> None:
    """Shapes and parameter counts of a real-size pair without memory (the recipes' check)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(make_teacher("qwen2").config)
    clone = LowRankClone(teacher, hidden_size=32)
    assert all(p.is_meta for p in clone.parameters())
    real = LowRankClone(make_teacher("qwen2"), hidden_size=32)
    assert {n: p.shape for n, p in clone.named_parameters()} == {
        n: p.shape for n, p in real.named_parameters()
    }


def _grads(clone: LowRankClone) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in clone.named_parameters() if p.grad is not None}


def _generations(clone: LowRankClone) -> dict[str, int]:
    """How often each generated tensor has been made, by exported name."""
    return {spec.name: spec.generations for spec in clone.generated_tensors()}


def test_cached_weights_give_the_same_gradients_over_micro_batches() -> None:
    teacher = make_teacher("llama", tied=False)
    batches = [_batch(10), _batch(11)]
    results = []
    for cache in (False, True):
        clone = LowRankClone(teacher, hidden_size=32, init_std=0.1, seed=4, cache_weights=cache)
        assert set(_generations(clone).values()) == {0}
        for ids, mask in batches:  # two micro-batches, one optimizer step
            out = clone(ids, mask, with_teacher=True)
            loss = F.log_softmax(out.logits, -1)[..., 7].mean() + sum(out.clone_losses.values())
            loss.backward()
        clone.flush_weight_grads()
        # How often each generated tensor was made: every forward, or once per step.
        generations = _generations(clone)
        assert len(generations) == 2 * 7 + 2  # every linear of both layers, embed, head
        assert len(set(generations.values())) == 1, generations
        results.append((_grads(clone), next(iter(generations.values()))))
    (plain, n_plain), (cached, n_cached) = results
    assert n_plain == 2 and n_cached == 1
    assert plain.keys() == cached.keys()
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-7)


def test_cached_weights_refuse_a_step_without_flush() -> None:
    teacher = make_teacher("llama")
    clone = LowRankClone(teacher, hidden_size=32, cache_weights=True)
    clone(torch.tensor([[5, 6]])).logits.sum().backward()
    with torch.no_grad():
        clone.embed_projection.add_(1.0)  # an optimizer step that never saw the gradients
    with pytest.raises(RuntimeError, match="flush_weight_grads"):
        clone(torch.tensor([[5, 6]]))


def _autocast_step(clone: LowRankClone, batches, autocast: bool) -> dict[str, torch.Tensor]:
    """Forward + backward of each micro-batch (under bf16 autocast, as Lightning's bf16-mixed
    does), then the flush an optimizer step would be preceded by."""
    clone.zero_grad(set_to_none=True)
    for ids, mask in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = clone(ids, mask, with_teacher=True)
            loss = F.log_softmax(out.logits.float(), -1)[..., 7].mean()
            loss = loss + sum(out.clone_losses.values())
        loss.backward()
    clone.flush_weight_grads()
    return _grads(clone)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_cached_weights_under_bf16_autocast_follow_the_in_graph_path(micro_batches) -> None:
    """Under autocast the cached weights are generated in bf16 (tensor cores, half the memory)
    and flushed with bf16 matmuls: the gradients match autograd through the uncached,
    in-graph generation under the same autocast (reference 1) and fp32 (reference 2)."""
    teacher = make_teacher("llama", tied=False)
    batches = [_batch(20 + i) for i in range(micro_batches)]
    grads = {}
    for cache, autocast in ((True, True), (False, True), (False, False)):
        clone = LowRankClone(teacher, 32, init_std=0.1, seed=8, cache_weights=cache)
        grads[cache, autocast] = _autocast_step(clone, batches, autocast)
        if cache:
            cached_weights = clone.cached_weights().values()
            assert {w.dtype for w in cached_weights if w.requires_grad} == {torch.bfloat16}
    cached, in_graph, fp32 = grads[True, True], grads[False, True], grads[False, False]
    assert cached.keys() == in_graph.keys() == fp32.keys()
    for name in cached:
        # The same bf16 products (measured: identical with one micro-batch); with two, the
        # cached weights' gradients are summed in bf16 before one flush, the in-graph ones as
        # fp32 projection gradients (measured: 0.6% of the largest entry). bf16 against fp32:
        # 1.2%.
        tol = 1e-6 if micro_batches == 1 else 1.5e-2
        scale = in_graph[name].abs().max()
        assert (cached[name] - in_graph[name]).abs().max() <= tol * scale, name
        assert (cached[name] - fp32[name]).abs().max() <= 3e-2 * fp32[name].abs().max(), name


def test_cached_weights_refuse_a_dtype_change_within_a_step() -> None:
    teacher = make_teacher("llama")
    clone = LowRankClone(teacher, hidden_size=32, cache_weights=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clone(torch.tensor([[5, 6]])).logits.float().sum().backward()
    with pytest.raises(RuntimeError, match="dtype changed"):
        clone(torch.tensor([[5, 6]]))
    clone.flush_weight_grads()  # after the step's flush, an fp32 forward regenerates in fp32
    assert clone(torch.tensor([[5, 6]])).logits.dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    teacher = make_teacher("mistral")
    grads = []
    for ckpt in (False, True):
        clone = LowRankClone(teacher, 32, init_std=0.1, seed=5, gradient_checkpointing=ckpt)
        ids, mask = _batch(4)
        out = clone(ids, mask, with_teacher=True)
        (out.logits.float().pow(2).mean() + sum(out.clone_losses.values())).backward()
        grads.append(_grads(clone))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_runs_and_stays_close() -> None:
    teacher = make_teacher("llama")
    clone = LowRankClone(teacher, 32, init_std=0.2, seed=6, cache_weights=True)
    ids, mask = _batch(5)
    with torch.no_grad():
        ref = clone(ids, mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = clone(ids, mask, with_teacher=True)
    assert out.logits.dtype == torch.bfloat16
    assert _max_rel_err(out.logits.float(), ref, mask) < 5e-2


def test_activation_pca_at_full_rank_reproduces_an_untied_teacher() -> None:
    teacher = make_teacher("llama", tied=False)
    ids, mask = _batch(6, length=32)
    clone = LowRankClone(teacher, hidden_size=64, init="activation_pca", probe_input_ids=ids)
    with torch.no_grad():
        out = clone(ids, mask, with_teacher=True)
    assert _max_rel_err(out.logits, out.teacher_logits, mask) < 1e-4
    for value in out.clone_losses.values():
        assert value.item() < 1e-8


def test_informed_inits_start_closer_to_the_teacher_than_random() -> None:
    teacher = make_teacher("llama", tied=True)
    probe, _ = _batch(7, length=64)
    ids, mask = _batch(8)

    def kl(init: str) -> float:
        clone = LowRankClone(teacher, 32, init=init, probe_input_ids=probe, seed=0)
        with torch.no_grad():
            out = clone(ids, mask, with_teacher=True)
        lt, ls = out.teacher_logits.log_softmax(-1), out.logits.log_softmax(-1)
        return (lt.exp() * (lt - ls)).sum(-1)[mask.bool()].mean().item()

    normal, pca, emb = kl("normal"), kl("activation_pca"), kl("embedding_pca")
    assert pca < 0.5 * normal
    assert emb < normal


def test_activation_pca_without_probe_ids_says_what_to_do() -> None:
    teacher = make_teacher("llama")
    with pytest.raises(ValueError, match=r"probe_input_ids.*probe_batch.*LowRankCloneBuilder"):
        LowRankClone(teacher, 32, init="activation_pca")
    builder = LowRankCloneBuilder(hidden_size=32, init="activation_pca")
    with pytest.raises(ValueError, match=r"probe_input_ids=.*probe_batch.*embedding_pca"):
        builder(teacher)


def test_builder_requests_a_probe_only_for_activation_pca() -> None:
    assert LowRankCloneBuilder(hidden_size=32).probe_request() is None
    assert LowRankCloneBuilder(hidden_size=32, init="embedding_pca").probe_request() is None
    builder = LowRankCloneBuilder(32, init="activation_pca", probe_texts=["a b"], probe_tokens=99)
    assert builder.probe_request() == (["a b"], 99)
    assert LowRankCloneBuilder(32, init="activation_pca").probe_request() == (None, 8192)
    teacher = make_teacher("llama", tied=False)
    ids, _ = _batch(6, length=32)
    built = builder(teacher, probe_input_ids=ids)
    direct = LowRankClone(teacher, 32, init="activation_pca", probe_input_ids=ids, seed=0)
    assert built.state_dict().keys() == direct.state_dict().keys()
    for name, value in direct.state_dict().items():
        assert torch.equal(built.state_dict()[name], value), name


@pytest.mark.parametrize("by_name", [True, False])
def test_distillation_module_builds_the_requested_probe(tiny_teacher_dir, by_name) -> None:
    """The module tokenises the builder's probe with the teacher's tokenizer: its own (teacher
    given by name) or the one of the teacher object's name_or_path."""
    from lrkd.module import DistillationModule

    texts = ["The quick brown fox jumps over the lazy dog. " * 4] * 6
    builder = LowRankCloneBuilder(32, init="activation_pca", probe_texts=texts, probe_tokens=512)
    teacher = str(tiny_teacher_dir) if by_name else load_teacher(str(tiny_teacher_dir))
    module = DistillationModule(teacher, builder, loss=Loss(clone_weight=0.2))
    ids = probe_batch(load_tokenizer(str(tiny_teacher_dir)), texts, 512)
    assert ids.shape == (2, 256)
    expected = LowRankClone(module.teacher, 32, init="activation_pca", probe_input_ids=ids)
    for name, value in expected.state_dict().items():
        assert torch.equal(module.student.state_dict()[name], value), name


def test_distillation_module_without_a_teacher_tokenizer_names_the_fix() -> None:
    from lrkd.module import DistillationModule

    builder = LowRankCloneBuilder(32, init="activation_pca")
    with pytest.raises(ValueError, match=r"teacher by name.*probe_input_ids.*embedding_pca"):
        DistillationModule(make_teacher("llama"), builder)  # built from a config: no name
    plain = DistillationModule(make_teacher("llama"), LowRankCloneBuilder(32, init="embedding_pca"))
    assert isinstance(plain.student, LowRankClone)


def test_errors_name_the_fix() -> None:
    teacher = make_teacher("llama")
    with pytest.raises(ValueError, match="hidden_size=65 must be between 1 and the teacher's"):
        LowRankClone(teacher, hidden_size=65)
    with pytest.raises(ValueError, match=r"multiple of the teacher's 4 attention heads.*28 or 32"):
        LowRankClone(teacher, hidden_size=30)
    with pytest.raises(ValueError, match="clone_terms"):
        LowRankClone(teacher, 32, clone_terms=["qq"])
    with pytest.raises(ValueError, match="init="):
        LowRankClone(teacher, 32, init="svd")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=TINY_VOCAB))
    with pytest.raises(ValueError, match=r"llama, mistral, qwen2, qwen3.*gpt2"):
        LowRankCloneBuilder(hidden_size=16)(gpt2)


def test_export_loads_without_lrkd(tmp_path) -> None:
    teacher = make_tiny_llama(seed=0)
    clone = LowRankClone(teacher, hidden_size=32, seed=0)
    exported = clone.materialize()
    exported.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 30, 31, 32, 33]])
    with torch.no_grad():
        expected = clone(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys; sys.modules['lrkd'] = None\n"  # any import of lrkd fails
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"torch.save(m(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    logits = torch.load(tmp_path / "logits.pt")
    assert _max_rel_err(logits, expected, torch.ones_like(ids)) <= 1e-4


def test_distillation_module_generates_weights_once_per_optimizer_step(tiny_teacher_dir) -> None:
    from lightning.pytorch import Trainer

    from lrkd.data.text import TextDataModule
    from lrkd.module import DistillationModule

    torch.manual_seed(0)
    module = DistillationModule(
        str(tiny_teacher_dir),
        LowRankCloneBuilder(hidden_size=32),
        loss=Loss(ce_weight=0.5, clone_weight=0.2),
    )
    clone = module.student
    before = {k: v.clone() for k, v in clone.state_dict().items()}
    trainer = Trainer(
        max_steps=3, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
    )  # fmt: skip
    data = TextDataModule(tokenizer=str(tiny_teacher_dir), seq_length=32, batch_size=2,
                          builtin_documents=100)  # fmt: skip
    trainer.fit(module, data)
    assert trainer.global_step == 3
    # Six micro-batches, three optimizer steps: every generated tensor was made three times.
    assert set(_generations(clone).values()) == {3}
    for name, value in clone.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} did not train"


@pytest.mark.parametrize(("tied", "tie_projection"), [(True, False), (False, True)])
def test_projection_tying_and_norm_eps_export_the_same_model(tied, tie_projection) -> None:
    """tie_embedding_projection against the teacher's tying, and norm_eps: the exported model
    computes the clone's logits, ties its embeddings only when both are tied, and carries the
    student's epsilon."""
    teacher = make_teacher("llama", tied)
    clone = LowRankClone(teacher, hidden_size=40, init_std=0.2, seed=1, norm_eps=1e-3,
                         tie_embedding_projection=tie_projection)  # fmt: skip
    assert (clone.head_projection is None) is tie_projection
    assert not clone.tied
    ids, mask = _batch()
    with torch.no_grad():
        logits = clone(ids, mask).logits
        exported = clone.materialize()
        ref = exported(input_ids=ids, attention_mask=mask).logits
    assert exported.config.rms_norm_eps == 1e-3
    assert not exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() != exported.model.embed_tokens.weight.data_ptr()
    head = teacher.lm_head.weight @ (
        clone.embed_projection if tie_projection else clone.head_projection
    )
    torch.testing.assert_close(exported.lm_head.weight, head.detach())
    assert _max_rel_err(logits, ref, mask) <= 1e-4


def test_activation_pca_with_a_tied_projection_over_an_untied_teacher_fits_the_head() -> None:
    """The final-norm gain is fitted in the LM head's metric: the start is far closer to the
    teacher than the untied projections' activation_pca is to a random normal start."""
    teacher = make_teacher("llama", tied=False)
    ids, mask = _batch()
    probe = torch.randint(4, TINY_VOCAB, (8, 32), generator=torch.Generator().manual_seed(9))
    kl = {}
    for name, kwargs in {
        "pca_tied_projection": dict(init="activation_pca", tie_embedding_projection=True),
        "normal": dict(init="normal", init_std=0.02),
    }.items():
        clone = LowRankClone(teacher, hidden_size=64, probe_input_ids=probe, seed=0, **kwargs)
        with torch.no_grad():
            out = clone(ids, mask, with_teacher=True)
        log_p = torch.log_softmax(out.teacher_logits.double(), -1)
        log_q = torch.log_softmax(out.logits.double(), -1)
        kl[name] = ((log_p.exp() * (log_p - log_q)).sum(-1)[mask.bool()]).mean().item()
    assert kl["pca_tied_projection"] < 0.25 * kl["normal"], kl
