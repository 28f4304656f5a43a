"""The theory callbacks in a real Trainer on tiny models: RepresentationDiagnostics against CKA
and KL computed by hand from transformers' own hidden states, GradientSNRByPassRate against
per-problem gradients taken one by one, and the bar image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_paced_datamodule
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lrkd.callbacks.diagnostics import (
    GradientSNRByPassRate,
    RepresentationDiagnostics,
    bar_image,
)
from lrkd.callbacks.pacing import PassRatePacing
from lrkd.data.text import TextDataModule
from lrkd.diagnostics.rank import spectral_tail
from lrkd.diagnostics.representation import linear_cka
from lrkd.diagnostics.snr import gradient_snr
from lrkd.losses import kd_divergence
from lrkd.models.lowrank import LowRankCloneBuilder
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule
from lrkd.objective import next_token_targets


def _trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    args = dict(
        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        default_root_dir=str(tmp_path), max_steps=4, callbacks=callbacks,
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
    )  # fmt: skip
    args.update(kwargs)
    return Trainer(**args)


def _text_data(teacher_dir) -> TextDataModule:
    return TextDataModule(tokenizer=str(teacher_dir), seq_length=24, batch_size=4,
                          builtin_documents=20, val_fraction=0.2)  # fmt: skip


def _reference_hidden(model, batch, layers: list[int]) -> list[torch.Tensor]:
    """Hidden states after decoder layer i, from transformers' ``output_hidden_states`` (entry
    i + 1; the last entry is after the final norm, so only non-final layers are compared)."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=True)  # fmt: skip
    return [out.hidden_states[i + 1] for i in layers]


@pytest.mark.parametrize("student_kind", ["lrc", "plain"])
def test_representation_diagnostics_match_a_hand_computation(
    tmp_path, tiny_teacher_dir, student_kind
) -> None:
    if student_kind == "lrc":
        student = LowRankCloneBuilder(hidden_size=32, init_std=0.1, seed=0)
    else:  # 3 layers against the teacher's 2: layer j matches teacher layer round(2(j+1)/3) - 1
        student = FromTeacherConfig(hidden_size=32, num_hidden_layers=3, seed=0)
    module = DistillationModule(str(tiny_teacher_dir), student, teacher_dtype="float32")
    callback = RepresentationDiagnostics(every_n_steps=2, max_probe_tokens=60)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(module, datamodule=_text_data(tiny_teacher_dir))
    last = callback.last
    assert callback.last_step == 4  # evaluated at the start and at steps 2 and 4

    batch = callback.probe(trainer, torch.device("cpu"))
    real = batch["attention_mask"].bool()
    assert 2 <= int(real.sum()) <= 60
    module.eval()
    with torch.no_grad():
        teacher = module.teacher
        if student_kind == "lrc":
            plain = module.student.materialize()
            s_layers, t_layers = [0], [0]  # non-final layers of the 2-layer pair
        else:
            plain = module.student
            s_layers, t_layers = [0, 1], [0, 0]  # round(2/3) - 1 = 0, round(4/3) - 1 = 0
        s_hidden = _reference_hidden(plain, batch, s_layers)
        t_hidden = _reference_hidden(teacher, batch, t_layers)
        for j, s, t in zip(s_layers, s_hidden, t_hidden, strict=True):
            expected = linear_cka(s[real].double(), t[real].double())
            got = last[f"diagnostics/cka/layer_{j:02d}"]
            assert got == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
        n_layers = 2 if student_kind == "lrc" else 3
        ckas = [last[f"diagnostics/cka/layer_{j:02d}"] for j in range(n_layers)]
        assert last["diagnostics/cka_mean"] == pytest.approx(float(np.mean(ckas)))
        assert all(0.0 <= c <= 1.0 for c in ckas)

        s_logits = plain(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        _, mask = next_token_targets(batch)
        kl = kd_divergence(s_logits, t_logits, "forward_kl", mask=mask, reduction="mean")
        assert last["diagnostics/heldout_kl"] == pytest.approx(float(kl), rel=1e-4)

    # The rank-bottleneck tail was logged once (at the start), from the teacher's layer 0.
    assert "diagnostics/rank_bottleneck/tail_mean" not in last
    tail = spectral_tail(t_hidden[0][real].double(), [32])[0]
    scalars = _event_scalars(tmp_path)
    logged = scalars["diagnostics/rank_bottleneck/layer_00"]
    assert len(logged) == 1 and logged[0] == pytest.approx(float(tail), rel=1e-5, abs=1e-7)
    assert len(scalars["diagnostics/cka_mean"]) == 3
    assert "diagnostics/cka_by_layer" in _event_images(tmp_path)


def _accumulator(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (directory,) = list((tmp_path / "tb").glob("version_*"))
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return acc


def _event_scalars(tmp_path) -> dict[str, list[float]]:
    acc = _accumulator(tmp_path)
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _event_images(tmp_path) -> list[str]:
    return _accumulator(tmp_path).Tags()["images"]


@pytest.mark.parametrize("student_kind", ["plain", "lrc"])
def test_gradient_snr_by_pass_rate_matches_per_problem_gradients(
    tmp_path, tiny_teacher_dir, student_kind
) -> None:
    if student_kind == "lrc":  # cached weights: the callback must reach the projections
        student = LowRankCloneBuilder(hidden_size=32, init_std=0.1, seed=0, cache_weights=True)
    else:
        student = FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0)
    module = DistillationModule(str(tiny_teacher_dir), student, teacher_dtype="float32")
    dm = tiny_paced_datamodule(tiny_teacher_dir, tmp_path / "cache", num_problems=24,
                               val_fraction=0.25, estimate_at_start=False)  # fmt: skip
    dm.setup()
    counts = torch.tensor([0, 1, 2, 3, 4, 0] * 3)  # K = 4: every bucket populated
    dm.set_pass_rates(counts)
    callback = GradientSNRByPassRate(problems_per_bucket=3, seed=5)
    trainer = _trainer(tmp_path, [callback, PassRatePacing()], max_steps=1)
    trainer.fit(module, datamodule=dm)
    measured_at_start = callback.last
    assert measured_at_start, "measured before the first step"

    # Reference: the same problems, one gradient at a time with plain autograd through
    # in-graph weights, at the weights the callback saw (the initial ones: rebuild them).
    module2 = DistillationModule(str(tiny_teacher_dir), student, teacher_dtype="float32")
    if student_kind == "lrc":
        module2.student.cache_weights = False
    module2.train()
    from lrkd.data.pacing import bucket_labels, bucketize
    from lrkd.data.tokens import pad_collate

    buckets = bucketize(counts.double() / 4, dm.bucket_edges)
    generator = torch.Generator().manual_seed(5)
    params = [p for p in module2.student.parameters() if p.requires_grad]
    compared = 0
    for b, label in enumerate(bucket_labels(dm.bucket_edges)):
        members = torch.nonzero(buckets == b).flatten()
        chosen = members[torch.randperm(len(members), generator=generator)[:3]].tolist()
        if len(chosen) < 2:  # no spread in a bucket of fewer than two problems: not reported
            assert label not in measured_at_start
            continue
        compared += 1
        grads = []
        for index in chosen:
            batch = pad_collate([dm.examples("train")[index]], pad_token_id=3)
            loss = module2.distillation_loss(batch)["loss"]
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        expected = gradient_snr(torch.stack(grads).double())
        got = measured_at_start[label]
        assert got.count == expected.count == len(chosen)
        assert got.mean_norm == pytest.approx(expected.mean_norm, rel=1e-4)
        assert got.spread == pytest.approx(expected.spread, rel=1e-4)
    assert compared >= 3
    assert "snr/by_bucket" in _event_images(tmp_path)


def test_gradient_snr_needs_a_paced_datamodule(tmp_path, tiny_teacher_dir) -> None:
    student = FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0)
    module = DistillationModule(str(tiny_teacher_dir), student, teacher_dtype="float32")
    trainer = _trainer(tmp_path, [GradientSNRByPassRate()], max_steps=1)
    with pytest.raises(ValueError, match="paced DataModule"):
        trainer.fit(module, datamodule=_text_data(tiny_teacher_dir))


def test_bar_image_draws_one_bar_per_value() -> None:
    image = bar_image([0.0, 0.5, 1.0, float("nan")], vmax=1.0, height=10, bar_width=4)
    assert image.shape == (3, 10, 16) and image.dtype == np.uint8
    filled = (image[0] != 255).sum(axis=0)  # coloured pixels per column
    assert filled.tolist() == [0, 0, 0, 0, 5, 5, 5, 0, 10, 10, 10, 0, 0, 0, 0, 0]
