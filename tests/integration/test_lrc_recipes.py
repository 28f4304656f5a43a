"""The real-scale Low-Rank Clone recipes (configs/lrc/<pair>.yaml) cannot ship with a typo.

For each recipe:

- as LightningCLI resolves it, it runs FSDP2 in bf16-mixed on 8 GPUs of one node, reads a
  prepared dataset and anneals its learning rate over exactly ``trainer.max_steps`` steps of the
  token budget;
- its loss, student settings (but the width), optimizer and scheduler form are
  configs/lrc/official_recipe.yaml's;
- the parameter counts and the per-device memory its header states are what the full-size
  teacher (built in code from its public config.json) and benchmarks/memory_table.py give;
- one ``fast_dev_run`` step of the recipe as shipped, narrowed to a tiny teacher of the same
  family and features, runs under its own FSDP2 strategy and bf16-mixed precision on 2 CPU
  processes and exports the student a direct construction gives.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tokenizer, tiny_config_fields

from lrkd.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "lrc"
OFFICIAL = CONFIGS / "official_recipe.yaml"
BENCHMARKS = ROOT / "benchmarks"
DEVICES, SEQ = 8, 2048


@dataclass(frozen=True)
class Recipe:
    """What a recipe is meant to be.

    Attributes:
        teacher: the teacher's Hub id.
        family: its transformers ``model_type``.
        hidden: the student's hidden size d_S.
        pair: its shape's name in benchmarks/shapes.py (``memory_table.py --pair``).
        max_steps: the steps of the token budget.
    """

    teacher: str
    family: str
    hidden: int
    pair: str
    max_steps: int


RECIPES = {
    # The official README's LRC-1.5B command: --max_steps 208000 (x 8 x 3 x 2048 = 10.2B tokens).
    "llama3.2-3b_to_1.5b": Recipe("meta-llama/Llama-3.2-3B-Instruct", "llama", 1536,
                                  "llama3.2-3b", 208_000),
    # 20B tokens (the paper's LRC-1.7B), 8 GPUs x micro-batch 3 x 2048 tokens a step.
    "qwen2.5-3b_to_1.7b": Recipe("Qwen/Qwen2.5-3B-Instruct", "qwen2", 1200, "qwen2.5-3b",
                                 math.ceil(20e9 / (DEVICES * 3 * SEQ))),
    # 20B tokens, lrkd's budget.
    "qwen3-4b_to_2.0b": Recipe("Qwen/Qwen3-4B", "qwen3", 1280, "qwen3-4b",
                               math.ceil(20e9 / (DEVICES * 3 * SEQ))),
}  # fmt: skip

# Model-card sizes (total and non-embedding parameters, as the cards round them).
CARD_SIZES = {
    "llama": ("3.21B", None),  # Llama-3.2-3B: 3.21B
    "qwen2": ("3.09B", "2.77B"),  # Qwen2.5-3B-Instruct: 3.09B, non-embedding 2.77B
    "qwen3": ("4.0B", "3.6B"),  # Qwen3-4B: 4.0B, non-embedding 3.6B
}


def full_teacher_config(family: str):
    """The full-size teacher's transformers config, from its public config.json.

    - llama: https://huggingface.co/meta-llama/Llama-3.2-3B-Instruct/blob/main/config.json
    - qwen2: https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/config.json
    - qwen3: https://huggingface.co/Qwen/Qwen3-4B/blob/main/config.json
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=128_256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
            num_attention_heads=24, num_key_value_heads=8, head_dim=128,
            max_position_embeddings=131_072, tie_word_embeddings=True, rms_norm_eps=1e-5,
            rope_theta=500_000.0,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        )  # fmt: skip
    if family == "qwen2":  # q/k/v biases (always, in Qwen2); head_dim = 2048 / 16 = 128
        return Qwen2Config(
            vocab_size=151_936, hidden_size=2048, intermediate_size=11_008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32_768,
            tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        )  # fmt: skip
    assert family == "qwen3"  # q/k norms; head_dim 128, not 2560 / 32
    return Qwen3Config(
        vocab_size=151_936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40_960, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
    )  # fmt: skip


def tiny_teacher_config(family: str):
    """A tiny teacher (2 layers, hidden 64, 4/2 heads, tests/conftest.py's) with the features
    of the family's real one: Llama-3's llama3 RoPE scaling, Qwen2's q/k/v biases, Qwen3's q/k
    norms and an explicit head_dim other than hidden / heads; tied embeddings."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if family == "llama":
        rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
        return LlamaConfig(
            **tiny_config_fields(rope_theta=500_000.0, rope_scaling=rope, rms_norm_eps=1e-5)
        )
    if family == "qwen2":
        return Qwen2Config(**tiny_config_fields(rope_theta=1e6, rms_norm_eps=1e-6))
    return Qwen3Config(**tiny_config_fields(head_dim=32, rope_theta=1e6, rms_norm_eps=1e-6))


_RESOLVED: dict[Path, dict] = {}


def resolved(path: Path, capsys) -> dict:
    """The config as ``lrkd fit --print_config`` resolves it (validated, nothing built)."""
    if path not in _RESOLVED:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(path), "--print_config"])
        assert exit_info.value.code in (0, None)
        _RESOLVED[path] = yaml.safe_load(capsys.readouterr().out)
    return _RESOLVED[path]


def header(path: Path) -> str:
    """The recipe's leading comment, its lines joined by single spaces."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(line for line in lines if line)


def stated_count(text: str, what: str) -> int:
    """A parameter count the header states (``<what> ... 1,234 parameters``)."""
    match = re.search(re.escape(what) + r"\s+([\d,]+) parameters", text)
    assert match, f"the header states no count for {what!r}"
    return int(match.group(1).replace(",", ""))


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def round_like_card(n: int, card: str) -> str:
    """``n`` rounded as a model card writes ``card`` (3.21B, 4.0B)."""
    decimals = len(card.split(".")[1].rstrip("B"))
    return f"{n / 1e9:.{decimals}f}B"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_fsdp2_bf16_on_8_gpus_from_prepared_data(name: str, capsys) -> None:
    recipe, config = RECIPES[name], resolved(CONFIGS / f"{name}.yaml", capsys)
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert trainer["strategy"]["class_path"] == "lrkd.distributed.FSDP2Strategy"
    assert trainer["strategy"]["init_args"]["save_distributed_checkpoint"] is True
    assert (trainer["accelerator"], trainer["devices"], trainer["num_nodes"]) == ("gpu", 8, 1)
    assert trainer["precision"] == "bf16-mixed"
    assert trainer["gradient_clip_val"] == 1.0
    assert (model["teacher_dtype"], model["activation_checkpointing"]) == ("auto", True)
    assert model["teacher"] == recipe.teacher
    assert model["student"]["init_args"]["hidden_size"] == recipe.hidden
    assert data["class_path"] == "lrkd.data.text.TextDataModule"
    assert data["init_args"]["prepared"]
    assert data["init_args"]["seq_length"] == SEQ
    assert trainer["max_steps"] == recipe.max_steps
    assert model["lr_scheduler"]["init_args"]["total_steps"] == trainer["max_steps"]
    assert trainer["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    callbacks = {c["class_path"]: c["init_args"] for c in trainer["callbacks"]}
    checkpoint = callbacks["lightning.pytorch.callbacks.ModelCheckpoint"]
    assert checkpoint["save_last"] is True and checkpoint["every_n_train_steps"] > 0
    assert callbacks["lrkd.callbacks.export.ExportStudent"]["dirpath"]
    # The header's token count is the run's: steps x 8 GPUs x micro-batch x 2048.
    tokens = trainer["max_steps"] * DEVICES * data["init_args"]["batch_size"] * SEQ
    assert f"= {tokens:,} tokens" in header(CONFIGS / f"{name}.yaml")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_keeps_the_official_model_loss_and_optimiser(name: str, capsys) -> None:
    official = resolved(OFFICIAL, capsys)["model"]
    model = resolved(CONFIGS / f"{name}.yaml", capsys)["model"]
    assert model["loss"] == official["loss"]
    student, reference = model["student"], official["student"]
    assert student["class_path"] == reference["class_path"]
    assert student["init_args"].keys() == reference["init_args"].keys()
    for key, value in reference["init_args"].items():
        if key != "hidden_size":
            assert student["init_args"][key] == value, key
    assert model["optimizer"] == official["optimizer"]
    scheduler, ours = official["lr_scheduler"], model["lr_scheduler"]
    assert ours["class_path"] == scheduler["class_path"]
    drop = {"total_steps"}
    assert {k: v for k, v in ours["init_args"].items() if k not in drop} == {
        k: v for k, v in scheduler["init_args"].items() if k not in drop
    }


@pytest.mark.parametrize("name", RECIPES)
def test_full_size_counts_are_the_headers(name: str, capsys) -> None:
    """Teacher and clone are built on the meta device (shapes, no memory)."""
    from transformers import AutoModelForCausalLM

    from lrkd.models.lowrank import LowRankCloneBuilder, student_config_for

    recipe, text = RECIPES[name], header(CONFIGS / f"{name}.yaml")
    init_args = resolved(CONFIGS / f"{name}.yaml", capsys)["model"]["student"]["init_args"]
    config = full_teacher_config(recipe.family)
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
    n_teacher = numel(teacher)
    assert n_teacher == stated_count(text, "teacher (frozen)")
    total, non_embedding = CARD_SIZES[recipe.family]
    assert round_like_card(n_teacher, total) == total
    if non_embedding:
        n_embed = teacher.model.embed_tokens.weight.numel()
        assert round_like_card(n_teacher - n_embed, non_embedding) == non_embedding

    clone = LowRankCloneBuilder(**init_args)(teacher)
    assert all(p.is_meta for p in clone.parameters())
    trainable = sum(p.numel() for p in clone.parameters())
    assert all(p.requires_grad for p in clone.parameters())
    # benchmarks/memory_table.py's formula.
    layers, d_t, d_s = config.num_hidden_layers, config.hidden_size, recipe.hidden
    qk_norms = 2 * layers * config.head_dim if recipe.family == "qwen3" else 0
    formula = layers * 7 * d_t * d_s + d_t * d_s + (2 * layers + 1) * d_s + qk_norms
    assert trainable == formula == stated_count(text, "trainable (projections + norms)")

    # materialize() builds clone.config (the dtype it records is the skeleton's).
    exported = student_config_for(config, d_s, init_args["norm_eps"], tied=clone.tied)
    ours, theirs = clone.config.to_dict(), exported.to_dict()
    assert {**ours, "dtype": None} == {**theirs, "dtype": None}
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(exported)
    assert numel(student) == stated_count(text, f"exported student (hidden {d_s})")
    if recipe.family == "qwen3":  # named after its size (the others: after the paper's names)
        assert name.endswith(f"_to_{numel(student) / 1e9:.1f}b")


@pytest.mark.parametrize("name", RECIPES)
def test_header_memory_is_the_memory_tables(name: str, capsys, monkeypatch) -> None:
    """The FSDP2 rows and the activation estimate the header quotes are what its quoted
    ``benchmarks/memory_table.py`` command prints."""
    text = header(CONFIGS / f"{name}.yaml")
    command = re.search(r"python benchmarks/memory_table\.py ((?:--[\w-]+ [\w.-]+ )+)",
                        text.replace("\\ ", "") + " ")  # fmt: skip
    assert command, "the header quotes no memory_table.py command"
    argv = command.group(1).split()
    options = dict(zip(argv[::2], argv[1::2], strict=True))
    batch = resolved(CONFIGS / f"{name}.yaml", capsys)["data"]["init_args"]["batch_size"]
    assert options == {"--pair": RECIPES[name].pair, "--world-sizes": str(DEVICES),
                       "--seq": str(SEQ), "--micro-batch": str(batch)}  # fmt: skip

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import memory_table

    memory_table.main(argv)
    out = capsys.readouterr().out
    table = dict(re.findall(r"^\| (.+?) \| ([\d.]+) \|$", out, flags=re.M))
    quoted = re.findall(r"\| (FSDP2 [^|]+?)\s+\| ([\d.]+) GiB \|", text)
    assert len(quoted) == 3
    for label, value in quoted:
        assert table[label] == value, label
    estimate = re.search(r"\*\*total \(estimate\)\*\* \| \*\*[\d,.]+\*\* \| \*\*([\d.]+)\*\*", out)
    assert f"tokens is {estimate.group(1)} GiB" in text


def _tiny_run_files(tmp_path: Path, family: str) -> tuple[Path, Path]:
    """A tiny teacher of ``family`` with tests/conftest.py's tokenizer saved beside it, and a
    prepared dataset of the built-in corpus made with the tokenizer as loaded from the teacher's
    directory, as ``lrkd prepare --tokenizer DIR`` does. (That is not ``make_tokenizer()``
    itself for every family: beside a ``qwen2`` config, transformers loads the saved tokenizer
    as a ``Qwen2Tokenizer``, with that class's byte-level pre-tokenizer.)"""
    from transformers import AutoModelForCausalLM

    from lrkd.data.manifest import PrepareSettings
    from lrkd.data.prepare import prepare
    from lrkd.data.tokens import resolve_tokenizer

    teacher_dir = tmp_path / f"tiny_{family}"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_teacher_config(family)).save_pretrained(teacher_dir)
    make_tokenizer().save_pretrained(teacher_dir)
    settings = PrepareSettings(seq_length=32, builtin_documents=40, val_fraction=0.1)
    prepared = prepare(None, tmp_path / "prepared", resolve_tokenizer(str(teacher_dir)),
                       settings, tokenizer_name=str(teacher_dir))  # fmt: skip
    return teacher_dir, prepared


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", RECIPES)
def test_one_step_of_the_recipe_on_2_cpu_processes(name: str, tmp_path, capsys) -> None:
    """``lrkd fit --config RECIPE`` with only the teacher, the data and the width narrowed, on
    2 CPU processes (FSDP2 over gloo, bf16-mixed as shipped), for one ``fast_dev_run`` step.

    The run's relative output directories (logs, checkpoints, the exported student) land in
    its working directory under ``tmp_path``. Under ``fast_dev_run`` Lightning replaces the
    logger and skips the periodic checkpoints, but callbacks run: ModelCheckpoint still writes
    its ``save_last`` checkpoint when training ends (Lightning 2.6), and ExportStudent writes the
    student. That student must be the one a direct ``LowRankCloneBuilder`` of the recipe's
    arguments gives: the one step is taken at the schedule's first learning rate, 1e-4 / 1e4 =
    1e-8, so Adam moves each weight by about 1e-8, and the export multiplies out the fp32
    masters, not FSDP2's bf16 gather (a wrong seed, width or tie would differ by O(1); bf16
    would by ~4e-3).
    """
    from transformers import AutoModelForCausalLM

    from lrkd.models.lowrank import LowRankCloneBuilder

    recipe = RECIPES[name]
    teacher_dir, prepared = _tiny_run_files(tmp_path, recipe.family)
    losses = tmp_path / "losses.jsonl"
    run = tmp_path / "run"
    run.mkdir()
    hidden = 32  # a multiple of the tiny teacher's 4 heads
    overrides = [
        "--model.teacher", str(teacher_dir),
        "--model.student.init_args.hidden_size", str(hidden),
        "--data.init_args.prepared", str(prepared),
        "--data.init_args.seq_length", "32",
        "--data.init_args.batch_size", "2",
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.fast_dev_run", "1",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    config = CONFIGS / f"{name}.yaml"
    overrides += ["--trainer.callbacks+=loss_recorder.RecordLosses",
                  f"--trainer.callbacks.path={losses}"]  # fmt: skip
    tests = ROOT / "tests"
    path = [str(ROOT), str(tests), str(tests / "distributed"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lrkd.cli", "fit", "--config", str(config), *overrides],
        capture_output=True, text=True, timeout=600, env=env, cwd=run,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "FSDP2 over 2 ranks" in output

    (row,) = [json.loads(line) for line in losses.read_text().splitlines()]
    assert row["step"] == 0 and math.isfinite(row["loss"]) and row["loss"] > 0

    init_args = resolved(config, capsys)["model"]["student"]["init_args"]
    student_dir = run / "runs" / f"lrc_{name}" / "student"
    exported = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    assert exported.config.model_type == recipe.family
    assert exported.config.hidden_size == hidden
    assert exported.config.rms_norm_eps == init_args["norm_eps"]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    t_config = teacher.config
    head_dim = getattr(t_config, "head_dim", None) or t_config.hidden_size // 4
    assert exported.config.head_dim == head_dim  # 32 for the Qwen3, 16 for the others
    assert exported.config.rope_parameters == teacher.config.rope_parameters
    reference = LowRankCloneBuilder(**{**init_args, "hidden_size": hidden})(teacher).materialize()
    ours, theirs = exported.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    if recipe.family == "llama":
        assert exported.config.rope_parameters["rope_type"] == "llama3"
    else:
        feature = {"qwen2": "q_proj.bias", "qwen3": "q_norm.weight"}[recipe.family]
        assert any(feature in key for key in ours)
    for key, value in theirs.items():
        scale = value.abs().max()
        assert (ours[key] - value).abs().max() <= 1e-5 * scale, key
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    assert torch.isfinite(exported(input_ids=ids).logits).all()
