"""The official Low-Rank Clone preset (configs/lrc/official_recipe.yaml) against an independent
float64 reference of the official recipe's loss.

The reference is written here from the equations of the paper (arXiv 2505.12781) and of the
official code's training objective (CURRENTF/LowRankClone at 7b458b2), with its own RMSNorm,
RoPE, grouped-query causal attention and SwiGLU, from the teacher's raw weight tensors:

    loss = CE(student) + sum_{b, l} KL_T(p_teacher || p_student) / B
         + alpha * sum_layers sum_terms mean((student - teacher)^2)

with student weights W_T @ P (input side) and P^T @ W_T (output side), embedding E_T @ P_emb,
head H_T @ P_emb (tied projection) or H_T @ P_head, student norms with their own epsilon, the
FFN-output target t_down @ P_down with gradient, and the attention-output term either in the
teacher's space (both attention outputs through the teacher's o_proj) or in the student's
(against t_o @ P_o). lrkd runs the preset's own settings through ``DistillationModule``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_VOCAB, frozen_with_random_gains, tiny_config_fields

from lrkd.models.lowrank import LowRankCloneBuilder
from lrkd.module import DistillationModule
from lrkd.objective import Loss

PRESET = Path(__file__).parents[2] / "configs" / "lrc" / "official_recipe.yaml"
F64 = torch.float64
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def preset() -> tuple[dict, Loss]:
    """The preset's student init_args and loss settings."""
    model = yaml.safe_load(PRESET.read_text())["model"]
    return dict(model["student"]["init_args"]), Loss(**model["loss"])


def make_teacher(family: str, tied: bool) -> torch.nn.Module:
    """A tiny random teacher (rms_norm_eps 1e-6, unlike the preset's student 1e-5) with
    non-trivial norm gains and, for Qwen2, q/k/v biases."""
    import transformers as tf

    torch.manual_seed(0)
    fields = tiny_config_fields(intermediate_size=96, tie_word_embeddings=tied, rms_norm_eps=1e-6)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**fields))
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**fields, use_sliding_window=False))
    return frozen_with_random_gains(model)


# ---------------------------------------------------------------- the float64 reference
def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [B, H, L, hd] at positions 0..L-1 (rotate-half convention)."""
    hd, length = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=F64) / hd)
    angles = torch.arange(length, dtype=F64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + rotated * sin


def attention(q, k, v, heads: int, kv_heads: int, theta: float) -> torch.Tensor:
    """Causal grouped-query attention of pre-RoPE q [B, L, heads*hd], k, v [B, L, kv*hd];
    returns the heads concatenated, before the output projection."""
    b, length, width = q.shape
    hd = width // heads

    def split(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.view(b, length, n, hd).transpose(1, 2)

    q, k, v = split(q, heads), split(k, kv_heads), split(v, kv_heads)
    q, k = rope(q, theta), rope(k, theta)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(b, length, width)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).mean()


def rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def reference_loss(
    teacher: torch.nn.Module,
    leaves: dict[str, torch.Tensor],
    ids: torch.Tensor,
    settings: dict,
    loss: Loss,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The official recipe's loss in float64, and its KL, CE and clone parts.

    Args:
        teacher: the teacher (its weights are read, cast to float64).
        leaves: the trained tensors by lrkd's parameter name (float64 leaves).
        ids: a packed batch [B, L] (no padding).
        settings: the student's init_args (attn_out_space, clone_target_grad, norm_eps, tie).
        loss: the loss settings (temperature, weights).
    """
    w = {k: v.to(F64) for k, v in teacher.state_dict().items()}
    config = teacher.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    theta, eps_t = rope_theta(config), config.rms_norm_eps
    eps_s = settings["norm_eps"] or eps_t
    tied_projection = settings["tie_embedding_projection"]
    target_grad = settings["clone_target_grad"]
    embed = w["model.embed_tokens.weight"]
    head = w.get("lm_head.weight", embed)
    p_emb = leaves["embed_projection"]
    p_head = p_emb if tied_projection else leaves["head_projection"]

    def bias(name: str) -> torch.Tensor | float:
        return w.get(name, 0.0)

    h_t, h_s = embed[ids], (embed @ p_emb)[ids]
    clone = torch.zeros((), dtype=F64)
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}."
        P = {m: leaves[f"blocks.{i}.projections.{m}"] for m in LINEARS}
        W = {m: w[pre + ("self_attn." if m in "qkvo" else "mlp.") + f"{m}_proj.weight"]
             for m in LINEARS}  # fmt: skip
        x_t = rms_norm(h_t, w[pre + "input_layernorm.weight"], eps_t)
        x_s = rms_norm(h_s, leaves[f"blocks.{i}.layer.input_layernorm.weight"], eps_s)
        qkv_t = [x_t @ W[m].T + bias(pre + f"self_attn.{m}_proj.bias") for m in "qkv"]
        qkv_s = [x_s @ (W[m] @ P[m]).T + bias(pre + f"self_attn.{m}_proj.bias") for m in "qkv"]
        a_t = attention(*qkv_t, heads, kv_heads, theta)
        a_s = attention(*qkv_s, heads, kv_heads, theta)
        o_t, o_s = a_t @ W["o"].T, a_s @ (P["o"].T @ W["o"]).T
        if settings["attn_out_space"] == "teacher":
            attn_out = mse(a_s @ W["o"].T, o_t)
        else:
            p_o = P["o"] if target_grad else P["o"].detach()
            attn_out = mse(o_s, o_t @ p_o)
        h_t, h_s = h_t + o_t, h_s + o_s
        y_t = rms_norm(h_t, w[pre + "post_attention_layernorm.weight"], eps_t)
        y_s = rms_norm(h_s, leaves[f"blocks.{i}.layer.post_attention_layernorm.weight"], eps_s)
        gate_t, up_t = y_t @ W["gate"].T, y_t @ W["up"].T
        gate_s, up_s = y_s @ (W["gate"] @ P["gate"]).T, y_s @ (W["up"] @ P["up"]).T
        d_t = (F.silu(gate_t) * up_t) @ W["down"].T
        d_s = (F.silu(gate_s) * up_s) @ (P["down"].T @ W["down"]).T
        p_down = P["down"] if target_grad else P["down"].detach()
        terms = [mse(s, t) for s, t in zip(qkv_s, qkv_t, strict=True)]
        terms += [mse(gate_s, gate_t), mse(up_s, up_t), attn_out, mse(d_s, d_t @ p_down)]
        clone = clone + sum(terms)
        h_t, h_s = h_t + d_t, h_s + d_s
    logits_t = rms_norm(h_t, w["model.norm.weight"], eps_t) @ head.T
    logits_s = rms_norm(h_s, leaves["norm.weight"], eps_s) @ (head @ p_head).T
    vocab = logits_s.shape[-1]
    ce = F.cross_entropy(logits_s[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    log_p = torch.log_softmax(logits_t / loss.temperature, -1)
    log_q = torch.log_softmax(logits_s / loss.temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum() / ids.shape[0]  # every position, over rows
    total = loss.kd_weight * kl + loss.ce_weight * ce + loss.clone_weight * clone
    return total, {"kd": kl, "ce": ce, "clone": clone}


# ---------------------------------------------------------------- lrkd on the same batch
def lrkd_step(
    teacher: torch.nn.Module,
    settings: dict,
    loss: Loss,
    ids: torch.Tensor,
    dtype: torch.dtype,
    fused: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """lrkd's loss terms, trained tensors and their gradients for one packed batch."""
    builder = LowRankCloneBuilder(**settings)
    module = DistillationModule(teacher=teacher, student=builder, loss=loss,
                                teacher_dtype="float32", fused_head=fused)  # fmt: skip
    module.to(dtype).train()
    with torch.no_grad():  # trained norm gains away from 1
        for name, p in module.student.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    ones = torch.ones_like(ids)
    terms = module.distillation_loss({"input_ids": ids, "attention_mask": ones, "loss_mask": ones})
    terms["loss"].backward()
    module.on_before_optimizer_step(None)  # cached weights' gradients -> projections
    params = {n: p for n, p in module.student.named_parameters() if p.requires_grad}
    return terms, {n: p.detach() for n, p in params.items()}, {n: p.grad for n, p in params.items()}


CASES = {  # (family, teacher tied, overrides of the preset's student settings)
    "llama_tied": ("llama", True, {}),
    "llama_untied": ("llama", False, {}),
    "qwen2": ("qwen2", True, {}),
    "llama_tied_student_space": ("llama", True, {"attn_out_space": "student"}),
    "qwen2_untied_student_space_untied_proj": (
        "qwen2", False, {"attn_out_space": "student", "tie_embedding_projection": False}
    ),
    "llama_fixed_targets": ("llama", True, {"clone_target_grad": False,
                                            "attn_out_space": "student"}),
}  # fmt: skip


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_head"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_preset_loss_and_gradients_equal_the_reference(case, dtype, fused) -> None:
    family, tied, overrides = CASES[case]
    settings, loss = preset()
    settings.update(hidden_size=32, init_std=0.2, seed=1, **overrides)
    teacher = make_teacher(family, tied)
    ids = torch.randint(4, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))

    terms, params, grads = lrkd_step(teacher, settings, loss, ids, dtype, fused)
    leaves = {n: p.to(F64).clone().requires_grad_(True) for n, p in params.items()}
    expected, parts = reference_loss(teacher, leaves, ids, settings, loss)
    expected.backward()

    for key in ("kd", "ce", "clone"):
        # At T = 40 both distributions are nearly uniform and the KL per position (~1e-5 here)
        # is a difference of log-probabilities of ~log(V): in float32 it resolves to ~1e-6
        # per position (its gradient, q - p, does not suffer; checked below).
        atol = 1e-6 * ids.shape[1] if key == "kd" and dtype == torch.float32 else 0.0
        torch.testing.assert_close(terms[key].double(), parts[key].detach(), rtol=1e-5,
                                   atol=atol, msg=key)  # fmt: skip
    torch.testing.assert_close(terms["loss"].double(), expected.detach(), rtol=1e-5, atol=0)
    assert grads.keys() == leaves.keys()
    for name, leaf in leaves.items():
        scale = leaf.grad.abs().max().item()
        torch.testing.assert_close(grads[name].double(), leaf.grad, rtol=1e-5,
                                   atol=1e-5 * scale, msg=name)  # fmt: skip


def test_the_two_attention_output_conventions_differ_where_they_should() -> None:
    """Teacher space: P_o gets no gradient from the attention-output term; student space: it
    does. Same teacher, projections and batch; only attn_out counts."""
    settings, loss = preset()
    loss = replace(loss, kd_weight=0.0, ce_weight=0.0, clone_weight=1.0)
    teacher = make_teacher("llama", True)
    ids = torch.randint(4, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    grads = {}
    for space in ("teacher", "student"):
        args = {**settings, "hidden_size": 32, "init_std": 0.2, "seed": 1,
                "clone_terms": ["attn_out"], "attn_out_space": space}  # fmt: skip
        _, _, grads[space] = lrkd_step(teacher, args, loss, ids, torch.float64, False)
    last = f"blocks.{teacher.config.num_hidden_layers - 1}.projections.o"
    assert grads["teacher"][last] is None or grads["teacher"][last].abs().max() == 0
    assert grads["student"][last].abs().max() > 0
    assert grads["teacher"]["blocks.0.projections.q"].abs().max() > 0


def test_batchmean_counts_every_position_and_divides_by_rows() -> None:
    """kd_reduction: batchmean = the token mean x (targets + last positions) / rows on a packed
    batch; the last position of a padded row is not counted."""
    from lrkd.models.paired_forward import PairedOutput
    from lrkd.objective import DistillationObjective, Targets

    torch.manual_seed(0)
    s, t = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    attention = torch.ones(3, 6, dtype=torch.long)
    attention[2, 4:] = 0  # right padding: row 2's last position is not a real token
    batch = {"input_ids": torch.randint(0, 11, (3, 6)), "attention_mask": attention,
             "loss_mask": torch.ones(3, 6, dtype=torch.long)}  # fmt: skip
    out = PairedOutput(student_logits=s, teacher_logits=t)
    batchmean = DistillationObjective(Loss(kd_reduction="batchmean"))(out, Targets.of(batch))
    log_p, log_q = torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    counted = attention.bool().clone()
    counted[2, 3] = False  # row 2's last real token predicts padding: not a target
    expected = (kl * counted).sum() / 3
    torch.testing.assert_close(batchmean["kd"].double(), expected, rtol=1e-6, atol=0)


def test_kd_reduction_is_checked() -> None:
    from lrkd.objective import DistillationObjective

    with pytest.raises(ValueError, match=r"kd_reduction='sum'.*token_mean, batchmean"):
        DistillationObjective(Loss(kd_reduction="sum"))
