"""Training from a teacher cache (``model.teacher_cache``): with k = the vocabulary the cached
step's loss and gradients equal the online step's, a whole run follows the online run's loss
trajectory, ``lrkd fit`` runs with no teacher weights on disk, a resumed run continues exactly,
and a cache that does not match the config is refused in one line naming the mismatch."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_VOCAB, make_tiny_llama, make_tokenizer
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lrkd.cli import console_main, main
from lrkd.data.cache_teacher import cache_teacher
from lrkd.data.manifest import PrepareSettings
from lrkd.data.prepare import prepare
from lrkd.data.prepared import PreparedExamples
from lrkd.data.text import TextDataModule
from lrkd.data.tokens import pad_collate
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule
from lrkd.objective import Loss

SEQ = 24


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher directory, built-in corpus text prepared with its tokenizer, and caches of
    it: k = the vocabulary in float32 at T = 1 and T = 2, and k = 8 in float16."""
    root = tmp_path_factory.mktemp("cached")
    teacher = root / "teacher"
    make_tiny_llama(seed=0).save_pretrained(teacher)
    make_tokenizer().save_pretrained(teacher)
    settings = PrepareSettings(seq_length=SEQ, builtin_documents=120, val_fraction=0.1)
    prepared = prepare(None, root / "prepared", make_tokenizer(), settings,
                       tokenizer_name=str(teacher))  # fmt: skip
    out = {"root": root, "teacher": teacher, "prepared": prepared}
    for name, k, temperature, dtype in (("full", TINY_VOCAB, 1.0, "float32"),
                                        ("full_t2", TINY_VOCAB, 2.0, "float32"),
                                        ("k8", 8, 1.0, "float16")):  # fmt: skip
        out[name] = cache_teacher(prepared, root / name, str(teacher), top_k=k,
                                  temperature=temperature, teacher_dtype="float32",
                                  logprob_dtype=dtype)  # fmt: skip
    return out


def student() -> FromTeacherConfig:
    return FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0)


def online_module(workdir, loss: Loss) -> DistillationModule:
    teacher = str(workdir["teacher"])
    return DistillationModule(teacher, student(), loss=loss, teacher_dtype="float32")


def cached_module(workdir, cache: str, loss: Loss) -> DistillationModule:
    return DistillationModule(student=student(), loss=loss, teacher_cache=str(workdir[cache]))


def batch_of(workdir, cache: str, n: int = 4) -> dict[str, torch.Tensor]:
    examples = PreparedExamples(workdir[cache] / "train").__getitems__(list(range(n)))
    return pad_collate(examples, pad_token_id=0)


def loss_and_grads(module: DistillationModule, batch) -> tuple[torch.Tensor, dict]:
    module.train()
    terms = module.distillation_loss(batch)
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in module.student.named_parameters()}
    return terms, grads


@pytest.mark.parametrize(
    ("kind", "cache", "temperature"),
    [("forward_kl", "full", 1.0), ("reverse_kl", "full_t2", 2.0), ("jsd", "full", 1.0),
     ("tvd", "full", 1.0)],
)  # fmt: skip
def test_a_full_vocabulary_cache_gives_the_online_loss_and_gradients(
    workdir, kind: str, cache: str, temperature: float
) -> None:
    loss = Loss(divergence=kind, temperature=temperature, ce_weight=0.5)
    batch = batch_of(workdir, cache)
    assert batch["topk_ids"].shape == (4, SEQ, TINY_VOCAB)
    online, online_grads = loss_and_grads(online_module(workdir, loss), batch)
    cached, cached_grads = loss_and_grads(cached_module(workdir, cache, loss), batch)
    for term in ("loss", "kd", "ce"):
        torch.testing.assert_close(cached[term], online[term], rtol=2e-5, atol=1e-7)
    assert online_grads.keys() == cached_grads.keys()
    for name, grad in online_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_top_k_cache_gives_a_lower_divergence_than_online(workdir) -> None:
    loss = Loss(divergence="forward_kl")
    batch = batch_of(workdir, "k8")
    online = online_module(workdir, loss).train().distillation_loss(batch)["kd"]
    cached = cached_module(workdir, "k8", loss).train().distillation_loss(batch)["kd"]
    assert 0 < cached < online


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(module: DistillationModule, cache: Path, steps: int, **trainer_args) -> list[float]:
    record = Losses()
    data = TextDataModule(prepared=str(cache), tokenizer=str(cache / "teacher"), seq_length=SEQ,
                          batch_size=4)  # fmt: skip
    callbacks = [record, *trainer_args.pop("callbacks", [])]
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=0,
        precision="32-true", **trainer_args,
        # without a ModelCheckpoint of the test's own, Lightning would write into the cwd
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=trainer_args.get("ckpt_path"))
    return record.losses


def test_a_run_from_a_full_cache_follows_the_online_trajectory(workdir) -> None:
    loss = Loss(ce_weight=0.5)
    seed_everything(0)
    online = fit(online_module(workdir, loss), workdir["full"], 6)
    seed_everything(0)
    cached = fit(cached_module(workdir, "full", loss), workdir["full"], 6)
    assert len(set(online)) == 6  # the loss moves
    torch.testing.assert_close(cached, online, rtol=1e-4, atol=0)


def test_a_resumed_run_from_a_cache_continues_exactly(workdir, tmp_path) -> None:

    loss = Loss(ce_weight=0.5)
    seed_everything(0)
    whole = fit(cached_module(workdir, "k8", loss), workdir["k8"], 6)
    seed_everything(0)
    save = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    first = fit(cached_module(workdir, "k8", loss), workdir["k8"], 3, callbacks=[save])
    seed_everything(0)
    record = Losses()
    data = TextDataModule(prepared=str(workdir["k8"]), tokenizer=str(workdir["k8"] / "teacher"),
                          seq_length=SEQ, batch_size=4)  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[record], limit_val_batches=0,
                      precision="32-true", enable_checkpointing=False)  # fmt: skip
    trainer.fit(cached_module(workdir, "k8", loss), datamodule=data,
                ckpt_path=str(tmp_path / "last.ckpt"))  # fmt: skip
    assert first == whole[:3]
    assert record.losses == whole[3:]


def config(workdir, tmp_path: Path, model: dict | None = None, data: dict | None = None,
           **extra) -> str:  # fmt: skip
    cfg = {
        "seed_everything": 0,
        "trainer": {"max_steps": 4, "accelerator": "cpu", "val_check_interval": 2,
                    "limit_val_batches": 2, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "runs"), "precision": "32-true",
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "c"}}},
        "model": {"teacher_cache": str(workdir["k8"]),
                  "student": {"class_path": "lrkd.models.students.FromTeacherConfig",
                              "init_args": {"hidden_size": 32, "num_hidden_layers": 1,
                                            "seed": 0}},
                  "loss": {"ce_weight": 0.5}, **(model or {})},
        "data": {"class_path": "lrkd.data.text.TextDataModule",
                 "init_args": {"seq_length": SEQ, "batch_size": 4, **(data or {})}},
        **extra,
    }  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_lrkd_fit_from_a_cache_with_no_teacher_weights_on_disk(workdir, tmp_path) -> None:
    """The cache is copied away from the teacher, which is then deleted: lrkd fit trains from the
    copy, whose teacher/ holds config and tokenizer files only."""
    cache = shutil.copytree(workdir["k8"], tmp_path / "cache")
    teacher = shutil.copytree(workdir["teacher"], tmp_path / "teacher")
    shutil.rmtree(teacher)
    assert not list(cache.rglob("*.safetensors")) and not list(cache.rglob("*.bin"))
    cli = main(["fit", "--config", config({"k8": cache}, tmp_path)])
    assert cli.trainer.global_step == 4
    assert type(cli.model.teacher).__name__ == "CachedTeacher"
    assert not list(cli.model.teacher.parameters())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((tmp_path / "runs" / "c").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/kd", "val/kd_forward_kl", "val/ce"} <= tags
    assert "val/ce_teacher" not in tags  # the teacher never ran
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def other_teacher_dir(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "other"
    make_tiny_llama(seed=1, **overrides).save_pretrained(path)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("teacher", "model.teacher='{other}', but model.teacher_cache="),
        ("temperature", "model.loss.temperature=2.0, but model.teacher_cache="),
        ("tokenizer", "data.prepared was tokenised with"),
        (
            "seq_length",
            f"data.seq_length=16, but data.prepared has seq_length={SEQ}; set "
            f"data.seq_length: {SEQ}, or it is a teacher cache: re-prepare its source",
        ),
        ("lrc", "model.student: LowRankCloneBuilder reads the teacher's weights"),
        ("on_policy", "an on-policy fraction of 0.5: model.teacher_cache holds no teacher"),
        ("prepared", "is neither model.teacher_cache="),
        ("missing", "is not a teacher cache (no manifest.json"),
        ("fused_head", "model.fused_head=true needs the teacher's hidden states"),
    ],
)
def test_a_mismatched_cache_is_refused_in_one_line(
    workdir, tmp_path, capsys, monkeypatch, case: str, message: str
) -> None:
    other = other_teacher_dir(tmp_path)
    model, data = {}, {}
    if case == "teacher":
        model = {"teacher": str(other)}
    elif case == "temperature":
        model = {"loss": {"temperature": 2.0}}
    elif case == "tokenizer":
        data = {"tokenizer": str(other)}
    elif case == "seq_length":
        data = {"seq_length": 16}
    elif case == "lrc":
        model = {"student": {"class_path": "lrkd.models.lowrank.LowRankCloneBuilder",
                             "init_args": {"hidden_size": 32}}}  # fmt: skip
    elif case == "on_policy":
        model = {"on_policy": {"fraction": 0.5}}
    elif case == "prepared":
        data = {"prepared": str(workdir["k8"] / "train")}
    elif case == "missing":
        model = {"teacher_cache": str(tmp_path / "nowhere")}
    elif case == "fused_head":
        model = {"fused_head": True}
    # The console script: some mismatches are found by the DataModule's setup, after the CLI
    # instantiated everything; the script ends those in one line too.
    monkeypatch.setattr(sys, "argv", ["lrkd", "fit", "--config",
                                      config(workdir, tmp_path, model, data)])  # fmt: skip
    with pytest.raises(SystemExit) as err:
        console_main()
    assert err.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message.format(other=other) in last, last


def test_the_cache_replaces_the_prepared_data_it_was_made_from(workdir, tmp_path) -> None:
    data = {"prepared": str(workdir["prepared"])}
    cli = main(["fit", "--config", config(workdir, tmp_path, data=data),
                "--trainer.max_steps", "1"])  # fmt: skip
    assert Path(cli.datamodule.prepared) == workdir["k8"]
    assert "topk_ids" in cli.datamodule.train_dataset[0]


def test_an_on_policy_second_stage_is_refused_before_training(workdir, tmp_path) -> None:
    from lrkd.callbacks.two_stage import TwoStageKL

    module = cached_module(workdir, "k8", Loss())
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                      callbacks=[TwoStageKL(switch_step=1)])  # fmt: skip
    data = TextDataModule(prepared=str(workdir["k8"]), tokenizer=str(workdir["k8"] / "teacher"),
                          seq_length=SEQ, batch_size=4)  # fmt: skip
    with pytest.raises(ValueError, match=r"TwoStageKL: an on-policy fraction of 1\.0"):
        trainer.fit(module, datamodule=data)
