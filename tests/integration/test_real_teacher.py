"""The real built-in teacher (SmolLM2-135M-Instruct) in the DistillationModule and the CLI."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrkd.cli import main
from lrkd.data.text import TextDataModule
from lrkd.models.students import FromTeacherConfig
from lrkd.module import DistillationModule
from lrkd.objective import Loss

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module() -> DistillationModule:
    return DistillationModule(
        teacher="smollm2-135m-instruct",
        student=FromTeacherConfig(hidden_size=64, num_hidden_layers=2, seed=0),
        loss=Loss(ce_weight=0.5),
        teacher_dtype="float32",  # fp32 parity below; auto would be bf16 on an AMX CPU
    )


def test_module_with_real_teacher(module: DistillationModule) -> None:
    assert module.tokenizer is not None and len(module.tokenizer) == 49152
    assert not module.teacher.training
    assert module.student.config.vocab_size == 49152
    dm = TextDataModule(seq_length=64, batch_size=2, builtin_documents=50)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module.eval()
    with torch.no_grad():
        reference = module.distillation_loss(batch)
    module.train()
    terms = module.distillation_loss(batch)
    assert "ce_teacher" not in terms  # evaluation only
    torch.testing.assert_close(terms["loss"], reference["loss"])
    # The pretrained teacher predicts the built-in corpus far better than a random student.
    assert reference["ce_teacher"] < 4.0 < terms["ce"]
    assert terms["kd"] > 0
    terms["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())


def test_teacher_logits_match_plain_transformers(module: DistillationModule) -> None:
    from lrkd.models.zoo import builtin_path

    reference = AutoModelForCausalLM.from_pretrained(builtin_path("smollm2-135m-instruct")).eval()
    tokenizer = AutoTokenizer.from_pretrained(builtin_path("smollm2-135m-instruct"))
    ids = tokenizer("Question: What is 6 times 7?\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        actual = module.teacher(input_ids=ids).logits
    torch.testing.assert_close(actual, expected)


def test_cli_fit_with_real_teacher(tmp_path) -> None:
    config = {
        "seed_everything": 0,
        "model": {
            "teacher": "smollm2-135m-instruct",
            "student": {
                "class_path": "lrkd.models.students.FromTeacherConfig",
                "init_args": {"hidden_size": 64, "num_hidden_layers": 2, "seed": 0},
            },
            "loss": {"divergence": "jsd", "temperature": 2.0},
        },
        "data": {
            "class_path": "lrkd.data.text.TextDataModule",
            "init_args": {"seq_length": 32, "batch_size": 2, "builtin_documents": 100},
        },
        "trainer": {
            "max_steps": 3,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "logger": False,
            "callbacks": [
                {
                    "class_path": "lrkd.callbacks.export.ExportStudent",
                    "init_args": {"dirpath": str(tmp_path / "student")},
                }
            ],
        },
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 3
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert tokenizer.chat_template is not None
    out = student.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=4)
    assert out.shape[1] >= 2


def test_low_rank_clone_of_the_real_teacher_matches_its_export(module: DistillationModule) -> None:
    """LRC parity on SmolLM2: clone logits vs the exported Llama's, fp32, padded batch; greedy
    generation identical; teacher logits from the co-run equal the teacher's own forward."""
    from lrkd.data.probe import probe_batch
    from lrkd.models.lowrank import LowRankClone

    teacher = module.teacher
    tokenizer = module.tokenizer
    probe = probe_batch(tokenizer, n_tokens=1024)
    clone = LowRankClone(teacher, hidden_size=90, init="activation_pca", probe_input_ids=probe)
    texts = ["The capital of France is", "Question: What is 7 + 5?\nAnswer:"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    exported = clone.materialize()
    with torch.no_grad():
        out = clone(ids, mask, with_teacher=True)
        ref = exported(input_ids=ids, attention_mask=mask).logits
        ref_teacher = teacher(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    rel = (out.logits - ref)[keep].abs().max() / ref[keep].abs().max()
    assert rel.item() <= 1e-4
    rel_t = (out.teacher_logits - ref_teacher)[keep].abs().max() / ref_teacher[keep].abs().max()
    assert rel_t.item() <= 1e-5
    assert exported.config.hidden_size == 90 and exported.config.head_dim == 64

    prompt = tokenizer(texts[1], return_tensors="pt")["input_ids"]
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, clone(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        generated = exported.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert torch.equal(seq, generated)


def test_paced_config_runs_and_logs_pacing_plots(tmp_path) -> None:
    """configs/paced/forward_kl_paced.yaml as shipped, shortened: teacher responses, a pass-rate
    estimate with the real verifier, weighted steps, validation pass@1, TensorBoard plots."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "runs"
    main([
        "fit", "--config", "configs/paced/forward_kl_paced.yaml",
        "--model.student.init_args.hidden_size", "189",
        "--data.num_problems", "30", "--data.rollouts.num_samples", "2",
        "--data.rollouts.max_new_tokens", "12", "--data.teacher_responses.max_new_tokens", "16",
        "--data.pacing.estimate_every_n_steps", "2", "--data.validation.num_samples", "1",
        "--data.teacher_responses.cache_dir", str(tmp_path / "cache"),
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"),
    ])  # fmt: skip
    (version,) = (runs / "forward_kl_paced").iterdir()
    events = EventAccumulator(str(version), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"pacing/pass_rate", "pacing/weight", "pacing/bucket"} <= set(tags["histograms"])
    assert len(events.Histograms("pacing/pass_rate")) == 2  # at the start and at step 2
    scalars = set(tags["scalars"])
    assert {"pacing/mean_pass_rate", "pacing/frontier_share", "pacing/bucket_count/p=0",
            "val/pass@1", "val/pass_rate", "val/pass@1_teacher"} <= scalars  # fmt: skip
    buckets = ("p=0", "(0,0.25]", "(0.25,0.5]", "(0.5,0.75]", "(0.75,1)", "p=1")
    counts = [events.Scalars(f"pacing/bucket_count/{b}")[0].value for b in buckets]
    assert sum(counts) == 24  # every training problem is in one bucket
    teacher = events.Scalars("val/pass@1_teacher")[-1].value
    assert 0.0 < teacher < 1.0  # the teacher solves some held-out problems, not all


def test_two_stage_config_switches_to_on_policy_reverse_kl(tmp_path) -> None:
    """configs/paced/two_stage_paced.yaml as shipped, shortened: forward KL for 2 steps, then
    the real student samples its own answers and trains on reverse KL over them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "runs"
    main([
        "fit", "--config", "configs/paced/two_stage_paced.yaml",
        "--model.student.init_args.hidden_size", "189",
        "--model.on_policy.max_new_tokens", "8",
        "--data.num_problems", "30", "--data.rollouts.num_samples", "2",
        "--data.rollouts.max_new_tokens", "12", "--data.teacher_responses.max_new_tokens", "16",
        "--data.pacing.estimate_every_n_steps", "0", "--data.validation.num_samples", "1",
        "--data.batch_size", "4",
        "--data.teacher_responses.cache_dir", str(tmp_path / "cache"),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
        "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"),
    ])  # fmt: skip
    (version,) = (runs / "two_stage_paced").iterdir()
    events = EventAccumulator(str(version), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/stage")] == [
        (0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0),
    ]  # fmt: skip
    notes = [
        e.tensor_proto.string_val[0].decode()
        for e in events.Tensors("two_stage/switch/text_summary")
    ]
    assert "stage 2 from step 2: divergence reverse_kl" in notes[-1]
    on_policy = [e.value for e in events.Scalars("train/on_policy")]
    assert on_policy[-2:] == [1.0, 1.0]
    tokens = [e.value for e in events.Scalars("train/response_tokens")][-2:]
    assert all(0 < t <= 8 for t in tokens)  # the student's completions, at most 8 tokens
    assert {"val/kd_reverse_kl", "val/pass@1"} <= set(events.Tags()["scalars"])
