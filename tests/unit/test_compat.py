"""Every entry of lrkd._compat against the installed transformers, Lightning and torch, and
against both call conventions of the transformers internals whose signatures moved (``cache``
in 5.24, ``past_key_values`` in 5.17-5.23), so a version's break shows here first."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, tiny_llama_config
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lrkd import _compat


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[3, 3, 17, 40, 99, 5], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


@pytest.mark.parametrize("sliding", [False, True])
def test_masks_and_layer_calls_reproduce_the_models_own_forward(sliding: bool) -> None:
    """causal_mask + call_decoder_layer, layer by layer, give the model's hidden states
    (left-padded batch; full and sliding-window attention)."""
    overrides = {"sliding_window": 3, "model_type": "mistral"} if sliding else {}
    if sliding:
        from transformers import MistralConfig, MistralForCausalLM

        fields = tiny_llama_config().to_dict()
        fields.update(sliding_window=3)
        fields.pop("model_type", None)
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(**fields)).eval()
    else:
        model = make_tiny_llama(**overrides)
    ids, mask = _padded_batch()
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True
        ).hidden_states
        hidden = model.model.embed_tokens(ids)
        kind = "sliding_attention" if sliding else "full_attention"
        attn = _compat.causal_mask(kind, model.config, hidden, mask, position_ids)
        rope = model.model.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(model.model.layers):
            torch.testing.assert_close(hidden, expected[i])
            hidden = _compat.call_decoder_layer(layer, hidden, attn, rope, position_ids)
    torch.testing.assert_close(model.model.norm(hidden), expected[-1])


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_causal_mask_passes_the_cache_under_either_name(monkeypatch, cache_name: str) -> None:
    from transformers import masking_utils

    seen = {}

    def fake(config, inputs_embeds, attention_mask, position_ids=None, **kw):
        seen.update(kw)
        return "mask"

    exec_ns: dict = {}
    # A function whose cache parameter is named like the version's (required, no default).
    exec(
        f"def f(config, inputs_embeds, attention_mask, {cache_name}, position_ids=None):\n"
        f"    return fake(config, inputs_embeds, attention_mask, position_ids,"
        f" {cache_name}={cache_name})",
        {"fake": fake},
        exec_ns,
    )
    monkeypatch.setattr(masking_utils, "create_causal_mask", exec_ns["f"])
    embeds = torch.zeros(1, 4, 8)
    assert _compat.causal_mask("full_attention", None, embeds, None, torch.arange(4)) == "mask"
    assert seen == {cache_name: None}


def test_causal_mask_names_transformers_when_a_new_parameter_is_required(monkeypatch) -> None:
    from transformers import masking_utils

    def new(config, inputs_embeds, attention_mask, cache, brand_new_argument):
        return None

    monkeypatch.setattr(masking_utils, "create_causal_mask", new)
    with pytest.raises(_compat.UnsupportedVersionError, match=r"transformers \d.*brand_new"):
        _compat.causal_mask("full_attention", None, torch.zeros(1, 2, 4), None, torch.arange(2))


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_call_decoder_layer_follows_the_layers_signature(cache_name: str) -> None:
    seen = {}

    class Layer(nn.Module):
        pass

    exec_ns: dict = {}
    exec(
        f"def forward(self, hidden_states, attention_mask=None, position_ids=None,"
        f" {cache_name}=None, use_cache=False, position_embeddings=None, **kwargs):\n"
        f"    seen.update(kwargs, {cache_name}={cache_name}, use_cache=use_cache)\n"
        f"    return (hidden_states * 2,)",
        {"seen": seen},
        exec_ns,
    )
    Layer.forward = exec_ns["forward"]
    out = _compat.call_decoder_layer(Layer(), torch.ones(2), None, None, torch.arange(2))
    torch.testing.assert_close(out, torch.full((2,), 2.0))  # a tuple output is unpacked
    assert seen == {cache_name: None, "use_cache": False}  # nothing through **kwargs


def test_kv_cached_decoding_equals_recomputing_the_whole_sequence() -> None:
    model = make_tiny_llama()
    assert _compat.supports_kv_cache(model)
    assert not _compat.supports_kv_cache(nn.Linear(2, 2))
    ids, mask = _padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = None
    step_ids, step_pos = ids, positions
    with torch.no_grad():
        for _ in range(3):
            logits, cache = _compat.forward_with_kv_cache(model, step_ids, mask, step_pos, cache)
            token = logits[:, -1].argmax(-1, keepdim=True)
            full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            torch.testing.assert_close(logits[:, -1], full, rtol=1e-4, atol=1e-5)
            ids = torch.cat([ids, token], 1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            step_pos = step_pos[:, -1:] + 1
            positions = torch.cat([positions, step_pos], 1)
            step_ids = token


def test_attention_implementation_and_layer_names() -> None:
    from transformers import LlamaForCausalLM

    eager = LlamaForCausalLM._from_config(tiny_llama_config(), attn_implementation="eager")
    assert _compat.attention_implementation(eager.config) == "eager"
    assert _compat.attention_implementation(object()) == "sdpa"
    assert _compat.no_split_module_names(eager) == {"LlamaDecoderLayer"}
    assert _compat.no_split_module_names(nn.Linear(2, 2)) == set()


def test_derived_config_drops_provenance_and_keeps_the_original() -> None:
    config = tiny_llama_config()
    config.name_or_path = "/somewhere/teacher"
    config.quantization_config = {"quant_method": "gguf"}
    derived = _compat.derived_config(config)
    assert not derived.name_or_path and not hasattr(derived, "quantization_config")
    assert derived.hidden_size == config.hidden_size
    assert config.name_or_path == "/somewhere/teacher"
    as_dict = _compat.drop_provenance(config.to_dict())
    assert "quantization_config" not in as_dict and "_name_or_path" not in as_dict
    assert as_dict["hidden_size"] == config.hidden_size


class _Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.by_cli = _compat.instantiated_by_cli()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(5, 2)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_entries_on_a_real_fit(tmp_path) -> None:
    module = _Tiny()
    assert _compat.attached_trainer(module) is None and not module.by_cli
    assert _compat.epoch_batches_done(object()) == 0

    done = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert _compat.attached_trainer(pl_module) is trainer
            done.append(_compat.epoch_batches_done(trainer))

    trainer = Trainer(max_steps=4, logger=False, enable_checkpointing=False, callbacks=[Record()],
                      enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module)
    assert done == [1, 2, 3, 4]


def test_instantiated_by_cli_inside_lightning_cli(tmp_path) -> None:
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(_Tiny, run=False, args=["--trainer.logger=false"],
                       trainer_defaults={"default_root_dir": str(tmp_path)})  # fmt: skip
    assert cli.model.by_cli


def test_strategy_entries() -> None:
    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    assert _compat.model_parallel_sizes(strategy) == ("auto", 1)
    _compat.resolve_auto_data_parallel(strategy, 4)
    assert _compat.model_parallel_sizes(strategy) == (4, 1)
    fsdp = FSDPStrategy(use_orig_params=True)
    kwargs = _compat.fsdp1_kwargs(fsdp)
    assert kwargs["use_orig_params"] is True
    kwargs["auto_wrap_policy"] = "x"
    assert _compat.fsdp1_kwargs(fsdp)["auto_wrap_policy"] == "x"  # the strategy's own dict


def test_tensor_version_counts_in_place_updates() -> None:
    p = nn.Parameter(torch.zeros(3))
    before = _compat.tensor_version(p)
    with torch.no_grad():
        p.add_(1.0)
    assert _compat.tensor_version(p) == before + 1
