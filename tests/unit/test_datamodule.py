"""DistillDataModule: normalisation, the sampler, teacher responses, the estimation cadence and
validation pass rates, with a tiny teacher in a real Trainer."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import tiny_paced_datamodule
from lightning.pytorch import Trainer

from lrkd.callbacks.pacing import PassRatePacing
from lrkd.data.datamodule import DistillDataModule, PacedSampler
from lrkd.data.problems import Problem, write_problems
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule


class RecordingModule(DistillationModule):
    """Records the weight of every training batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[list[int], list[float]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["problem_index"].tolist(), batch["weight"].tolist()))
        return super().training_step(batch, batch_idx)


def _datamodule(tmp_path, teacher_dir, **kwargs) -> DistillDataModule:
    return tiny_paced_datamodule(teacher_dir, tmp_path / "cache", **kwargs)


def _module(teacher_dir, cls=RecordingModule) -> DistillationModule:
    student = FromTeacherConfig(hidden_size=32, num_hidden_layers=1, seed=0)
    return cls(teacher=str(teacher_dir), student=student, teacher_dtype="float32")


def _trainer(tmp_path, **kwargs) -> Trainer:
    args = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    args.update(kwargs)
    args.setdefault("callbacks", [PassRatePacing()])
    return Trainer(**args)


# ------------------------------------------------------------- weights, normalisation, sampler


def _estimated(tmp_path, teacher_dir, counts: list[int], **kwargs) -> DistillDataModule:
    dm = _datamodule(tmp_path, teacher_dir, num_problems=len(counts) + 1, val_fraction=0.1,
                     **kwargs)  # fmt: skip
    dm.setup()
    assert len(dm.train_problems) == len(counts)
    dm.set_pass_rates(torch.tensor(counts))
    return dm


def test_loss_weights_are_normalised_over_the_drawn_problems(tmp_path, tiny_teacher_dir) -> None:
    counts = [0, 1, 2, 3, 4, 4, 2, 0]  # K = 4
    dm = _estimated(tmp_path, tiny_teacher_dir, counts)
    p = torch.tensor(counts, dtype=torch.float64) / 4
    raw = p * (1 - p)
    support = raw > 0
    assert dm.support().tolist() == torch.nonzero(support).flatten().tolist()
    expected = raw / raw[support].mean()
    torch.testing.assert_close(dm.loss_weights(), expected.float())
    assert float(dm.loss_weights()[dm.support()].mean()) == pytest.approx(1.0)

    keep_all = _estimated(tmp_path, tiny_teacher_dir, counts, skip_zero_weight=False)
    assert keep_all.support().tolist() == list(range(len(counts)))
    torch.testing.assert_close(keep_all.loss_weights(), (raw / raw.mean()).float())

    sampling = _estimated(tmp_path, tiny_teacher_dir, counts, apply_weights="sampling")
    torch.testing.assert_close(sampling.sampling_probabilities(), raw / raw.sum())
    assert sampling.loss_weights().tolist() == [1.0] * len(counts)


def test_sampler_draws_only_weighted_problems(tmp_path, tiny_teacher_dir) -> None:
    counts = [0, 2, 4, 1, 0, 3]
    dm = _estimated(tmp_path, tiny_teacher_dir, counts)
    sampler = PacedSampler(dm, num_samples=50, seed=0)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 50
    assert set(drawn) == {1, 3, 5}  # p = 0 and p = 1 are skipped
    # a walk through permutations: each problem drawn 50/3 times, give or take one
    assert all(16 <= c <= 17 for c in Counter(drawn).values())
    sampler.set_epoch(1)
    assert list(sampler) != drawn


def test_sampling_mode_frequencies_follow_the_weights(tmp_path, tiny_teacher_dir) -> None:
    counts = [1, 2, 4, 3, 0]
    dm = _estimated(tmp_path, tiny_teacher_dir, counts, apply_weights="sampling")
    n = 6000
    freq = Counter(PacedSampler(dm, num_samples=n, seed=3))
    probs = dm.sampling_probabilities()
    for i, prob in enumerate(probs.tolist()):
        sd = (n * prob * (1 - prob)) ** 0.5
        assert abs(freq.get(i, 0) - n * prob) <= 5 * sd + 1e-9, (i, freq.get(i, 0), n * prob)
    assert freq.get(2, 0) == 0 and freq.get(4, 0) == 0


def test_before_any_estimate_training_is_uniform(tmp_path, tiny_teacher_dir) -> None:
    dm = _datamodule(tmp_path, tiny_teacher_dir)
    dm.setup()
    assert dm.loss_weights().tolist() == [1.0] * len(dm.train_problems)
    assert len(dm.support()) == len(dm.train_problems)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weighting": "soft"}, "data.pacing.weighting"),
        ({"apply_weights": "both"}, "data.pacing.apply_weights"),
        ({"cold_start": "warm"}, "data.pacing.cold_start"),
        ({"teacher_responses": "teacher"}, "data.teacher_responses.source"),
        ({"prompt_template": "Q:"}, "data.prompt_template"),
        ({"num_rollouts": 0}, "data.rollouts.num_samples"),
        ({"rollout_top_p": 0.0}, "data.rollouts.top_p"),
        ({"rollout_temperature": -1.0}, "data.rollouts.temperature"),
        ({"bucket_edges": [0.5, 0.2]}, "data.pacing.bucket_edges must be strictly increasing"),
        ({"verifier": "nope"}, "data.verifier: unknown verifier 'nope'"),
    ],
)
def test_config_errors_name_the_field(tmp_path, tiny_teacher_dir, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _datamodule(tmp_path, tiny_teacher_dir, **kwargs)


# ------------------------------------------------------------------------ in a real Trainer


def test_estimation_cadence_in_steps_changes_the_weights(tmp_path, tiny_teacher_dir) -> None:
    dm = _datamodule(tmp_path, tiny_teacher_dir, estimate_every_n_steps=2,
                     estimate_every_n_epochs=None)  # fmt: skip
    history: list[tuple[int, torch.Tensor]] = []
    set_pass_rates = dm.set_pass_rates

    def spy(correct: torch.Tensor) -> None:
        set_pass_rates(correct)
        history.append((dm.trainer.global_step, dm.loss_weights().clone()))

    dm.set_pass_rates = spy
    module = _module(tiny_teacher_dir)
    _trainer(tmp_path, max_steps=5, limit_val_batches=0).fit(module, datamodule=dm)
    assert [step for step, _ in history] == [0, 2, 4]
    assert dm.rounds == 3
    assert not torch.equal(history[0][1], history[1][1])
    assert not torch.equal(history[1][1], history[2][1])
    # every batch carried the weights in force at its step
    boundaries = {0: history[0][1], 1: history[0][1], 2: history[1][1], 3: history[1][1],
                  4: history[2][1]}  # fmt: skip
    assert len(module.seen) == 5
    for step, (indices, weights) in enumerate(module.seen):
        expected = boundaries[step][indices]
        assert weights == pytest.approx(expected.tolist())
        assert all(w > 0 for w in weights)  # zero-weight problems are skipped


def test_estimation_cadence_in_epochs(tmp_path, tiny_teacher_dir) -> None:
    dm = _datamodule(tmp_path, tiny_teacher_dir, samples_per_epoch=8, estimate_every_n_epochs=2)
    _trainer(tmp_path, max_epochs=5, limit_val_batches=0).fit(
        _module(tiny_teacher_dir), datamodule=dm
    )
    assert dm.rounds == 3  # epochs 0 (start), 2 and 4
    assert dm.last_estimate["epoch"] == 4
    assert dm.last_estimate["step"] == 8  # 2 steps per epoch


def test_validation_reports_pass_rates_and_teacher_responses_are_cached(
    tmp_path, tiny_teacher_dir
) -> None:
    dm = _datamodule(tmp_path, tiny_teacher_dir)
    trainer = _trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(_module(tiny_teacher_dir), datamodule=dm)
    metrics = trainer.callback_metrics
    for name in ("val/pass@1", "val/pass_rate", "val/pass@1_teacher", "val/kd_forward_kl"):
        assert name in metrics, name
        assert 0.0 <= float(metrics[name]) <= (1.0 if "pass" in name else 100.0)
    # pass@1 by hand: greedy answers of the student on the held-out problems
    pacing = next(c for c in trainer.callbacks if isinstance(c, PassRatePacing))
    reference = pacing.evaluate(trainer, trainer.lightning_module)
    assert float(metrics["val/pass@1"]) == pytest.approx(reference["val/pass@1"])

    cached = sorted((tmp_path / "cache").glob("teacher-*.jsonl"))
    assert len(cached) == 2  # train and val
    stamps = [p.stat().st_mtime_ns for p in cached]
    lines = [json.loads(x) for x in cached[0].read_text().splitlines()]
    assert {"id", "ids"} <= set(lines[0])

    again = _datamodule(tmp_path, tiny_teacher_dir)
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(
        _module(tiny_teacher_dir), datamodule=again
    )
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read, not regenerated
    first = again.examples("train")[0]
    assert torch.equal(first["input_ids"], dm.examples("train")[0]["input_ids"])


def test_dataset_responses_are_used_and_required(tmp_path, tiny_teacher_dir) -> None:
    problems = [Problem(id=f"q{i}", prompt=f"{i}+{i}=", answer=str(2 * i), response=str(2 * i))
                for i in range(8)]  # fmt: skip
    path = write_problems(problems, tmp_path / "p.jsonl")
    dm = _datamodule(tmp_path, tiny_teacher_dir, train_files=[str(path)],
                     teacher_responses="dataset")  # fmt: skip
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(
        _module(tiny_teacher_dir), datamodule=dm
    )
    assert not (tmp_path / "cache").exists()
    example = dm.examples("train")[0]
    tok = dm.tokenizer
    response = tok.decode(example["input_ids"][example["loss_mask"].bool()],
                          skip_special_tokens=True)  # fmt: skip
    index = int(example["problem_index"])
    assert response == dm.train_problems[index].response

    bare = [Problem(id="a", prompt="1+1=", answer="2"), Problem(id="b", prompt="2+2=", answer="4")]
    path = write_problems(bare, tmp_path / "bare.jsonl")
    dm = _datamodule(tmp_path, tiny_teacher_dir, train_files=[str(path)],
                     teacher_responses="dataset")  # fmt: skip
    with pytest.raises(ValueError, match="have no response"):
        _trainer(tmp_path, max_steps=1).fit(_module(tiny_teacher_dir), datamodule=dm)


def test_pacing_state_survives_a_checkpoint(tmp_path, tiny_teacher_dir) -> None:
    dm = _datamodule(tmp_path, tiny_teacher_dir)
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(
        _module(tiny_teacher_dir), datamodule=dm
    )
    state = dm.state_dict()
    fresh = _datamodule(tmp_path, tiny_teacher_dir)
    fresh.load_state_dict(state)
    fresh.setup()
    fresh.restore_pass_rates()
    assert fresh.rounds == dm.rounds == 1
    torch.testing.assert_close(fresh.loss_weights(), dm.loss_weights())


def test_rollout_stop_sequences_are_checked_when_built() -> None:
    from lrkd.data.datamodule import DistillDataModule
    from lrkd.data.paced_settings import Rollouts

    with pytest.raises(ValueError, match=r"data\.rollouts\.stop: an empty stop string"):
        DistillDataModule(rollouts=Rollouts(stop=["\n\n", ""]))
    with pytest.raises(ValueError, match=r"data\.rollouts\.stop: token id -1 is negative"):
        DistillDataModule(rollouts=Rollouts(stop=[-1]))
    dm = DistillDataModule(rollouts=Rollouts(stop=["\n\n", "Question:", 2]))
    assert dm.rollouts.stop == ["\n\n", "Question:", 2]


def test_exclude_keeps_the_eval_items_out_of_training_and_validation(
    tiny_teacher_dir, tmp_path, caplog
) -> None:
    from conftest import tiny_paced_datamodule

    from lrkd.data.problems import excluded_prompts

    held_out = excluded_prompts(["lrkd_arithmetic"])
    plain = tiny_paced_datamodule(tiny_teacher_dir, tmp_path, num_problems=200,
                                  problem_kinds=["add"], difficulties=[1])  # fmt: skip
    plain.setup("fit")
    everything = plain.train_problems + plain.val_problems
    overlap = [p for p in everything if p.prompt in held_out]
    assert overlap  # level-1 additions: 81 distinct, so the eval set shares many

    dm = tiny_paced_datamodule(tiny_teacher_dir, tmp_path, num_problems=200,
                               problem_kinds=["add"], difficulties=[1],
                               exclude=["lrkd_arithmetic"])  # fmt: skip
    with caplog.at_level("INFO", logger="lrkd"):
        dm.setup("fit")
    kept = dm.train_problems + dm.val_problems
    assert not [p for p in kept if p.prompt in held_out]
    assert len(kept) == len(everything) - len(overlap)
    assert f"left out {len(overlap)} of 200 problems that lrkd_arithmetic also hold" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"data\.exclude"):
        tiny_paced_datamodule(tiny_teacher_dir, tmp_path, exclude=["nope.jsonl"])
