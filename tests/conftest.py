"""Shared fixtures: a tiny character-level tokenizer and tiny random Llama models, all offline."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 128  # 4 special tokens + printable ASCII, padded
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def stop_after(step: int):
    """A callback that ends training after optimizer step ``step`` (``trainer.should_stop``),
    as an interruption would, while ``trainer.max_steps`` stays the whole run's."""
    from lightning.pytorch import Callback

    class StopAfter(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step >= step:
                trainer.should_stop = True

    return StopAfter()


def make_tokenizer():
    """A character-level fast tokenizer over printable ASCII with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def even_first_character_verifier():
    """A verifier that accepts a completion whose first character has an even code: a random
    tiny model passes about half the time, so pass rates spread and move as the model changes."""
    from lrkd.data.verifiers import Verifier

    class EvenFirstCharacter(Verifier):
        def extract(self, completion: str) -> str | None:
            return completion[:1] or None

        def matches(self, candidate: str, answer: str) -> bool:
            return ord(candidate) % 2 == 0

    return EvenFirstCharacter()


def tiny_paced_datamodule(teacher_dir, cache_dir, **overrides):
    """A DistillDataModule of 24 built-in problems for the tiny teacher, with a verifier that a
    random model passes about half the time.

    Its word problems' prompts (up to 115 tokens) are longer than ``seq_length=48``, so no
    response token of theirs is a target: ``overlong="keep"`` keeps them as the golden runs do
    (``tests/golden/scenarios.py``), cut and with a warning.

    ``overrides`` replace any argument; a field of a setting block may be given by its short
    name of ``lrkd.data.paced_settings.RENAMED`` (``weighting="uniform"`` sets
    ``pacing.weighting``), and ``teacher_responses="dataset"`` sets its ``source``.
    """
    from dataclasses import replace

    from lrkd.data.datamodule import DistillDataModule
    from lrkd.data.paced_settings import (
        RENAMED,
        Pacing,
        Rollouts,
        TeacherResponses,
        Validation,
    )

    blocks = {
        "teacher_responses": TeacherResponses(max_new_tokens=6, cache_dir=str(cache_dir)),
        "rollouts": Rollouts(num_samples=4, max_new_tokens=4),
        "pacing": Pacing(),
        "validation": Validation(num_samples=2),
    }
    if isinstance(overrides.get("teacher_responses"), str):
        overrides["teacher_responses_source"] = overrides.pop("teacher_responses")
    renamed = {**RENAMED, "teacher_responses_source": "teacher_responses.source"}
    for name in [n for n in overrides if n in renamed]:
        block, field = renamed[name].split(".")
        blocks[block] = replace(blocks[block], **{field: overrides.pop(name)})
    args = dict(
        tokenizer=str(teacher_dir), num_problems=24, val_fraction=0.25, chat_template=False,
        verifier=even_first_character_verifier(), batch_size=4, seq_length=48,
        overlong="keep", **blocks,
    )  # fmt: skip
    args.update(overrides)
    return DistillDataModule(**args)


def tiny_config_fields(**overrides) -> dict:
    """Config fields of a tiny decoder (vocab 128, hidden 64, 2 layers, 4/2 heads)."""
    fields = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    fields.update(overrides)
    return fields


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**tiny_config_fields(**overrides))


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def save_tiny_teacher(directory):
    """The tiny Llama teacher and its tokenizer in ``directory``, written once: the multi-process
    scripts call this before DDP starts, so every process reads the same files."""
    from pathlib import Path

    directory = Path(directory)
    if not (directory / "config.json").exists():
        make_tiny_llama(seed=0).save_pretrained(directory)
        make_tokenizer().save_pretrained(directory)
    return directory


def tiny_student(kind: str):
    """The multi-process scripts' student builder: a Low-Rank Clone (``"lrc"``) or a one-layer
    randomly initialised copy of the teacher's architecture (anything else)."""
    from lrkd.models.lowrank import LowRankCloneBuilder
    from lrkd.models.students import FromTeacherConfig

    if kind == "lrc":
        return LowRankCloneBuilder(hidden_size=32, init_std=0.1)
    return FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0)


def frozen_with_random_gains(model):
    """``model`` in eval mode and frozen, its norm gains ~ U(0.5, 1.5) and biases ~ N(0, 0.1)
    (drawn from the global RNG), so that tests see non-trivial gains and biases."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A tiny random Llama teacher with its tokenizer, saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny_teacher")
    make_tiny_llama(seed=0).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Force the CPU probe of :mod:`lrkd.hardware`: ``cpu_bf16(8.0)`` makes ``auto`` pick bf16
    (as on an AMX Xeon), ``cpu_bf16(0.1)`` fp32 (as on an AVX2-only CPU); no CUDA either way.
    The probe's per-process cache is cleared before and after."""
    from lrkd import hardware

    def force(speedup: float) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv(hardware.PROBE_ENV, str(speedup))
        hardware.cpu_bf16_probe.cache_clear()

    hardware.cpu_bf16_probe.cache_clear()
    yield force
    hardware.cpu_bf16_probe.cache_clear()


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` are skipped, with the reason reported, when CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
