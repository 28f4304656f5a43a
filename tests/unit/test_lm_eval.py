"""lm-evaluation-harness: lrkd's built-in tasks, ``lrkd eval``, LMEvalCallback, and their errors.

The reference for every score is lrkd's own generation (:func:`lrkd.generation.sampling.generate`
and :func:`~lrkd.generation.pass_rates.count_correct`) on the same items with the same decoding,
and the same model evaluated by lm-eval from its directory.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_tiny_llama, make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrkd.callbacks.lm_eval import LMEvalCallback
from lrkd.cli import console_main, main
from lrkd.data.problems import builtin_problems
from lrkd.data.tokens import prompt_token_ids
from lrkd.data.verifiers import FinalNumber
from lrkd.errors import MissingDependency
from lrkd.evaluation.builtin import BUILTIN_TASKS, MAX_GEN_TOKS, STOP, problems_dataset
from lrkd.evaluation.command import eval_command
from lrkd.evaluation.harness import (
    EvalSettings,
    check_tasks,
    comparison_table,
    evaluate,
    scores,
    task_manager,
)
from lrkd.generation.pass_rates import count_correct
from lrkd.generation.sampling import generate

LIMIT = 12


@pytest.fixture(scope="module")
def manager():
    return task_manager()


def _docs(manager, task: str, limit: int) -> list[dict]:
    (task_object,) = manager.load([task])["tasks"].values()
    return [dict(d) for d in task_object.test_docs()][:limit]


def test_builtin_tasks_are_found_and_match_lrkd_settings(manager) -> None:
    assert set(BUILTIN_TASKS) <= set(manager.all_tasks)
    loaded = manager.load(list(BUILTIN_TASKS))["tasks"]
    by_name = {t.config.task: t for t in loaded.values()}
    for name in ("lrkd_arithmetic", "lrkd_word"):
        kwargs = by_name[name].config.generation_kwargs
        assert kwargs["until"] == list(STOP) and kwargs["max_gen_toks"] == MAX_GEN_TOKS
        assert kwargs["do_sample"] is False
        assert by_name[name].config.output_type == "generate_until"
    assert by_name["lrkd_corpus"].config.output_type == "loglikelihood_rolling"
    expected = builtin_problems(250, seed=1234, kinds=["add", "sub", "mul"])
    docs = list(by_name["lrkd_arithmetic"].test_docs())
    assert [d["prompt"] for d in docs] == [p.prompt for p in expected]
    assert [d["answer"] for d in docs] == [p.answer for p in expected]
    assert {d["kind"] for d in by_name["lrkd_word"].test_docs()} == {"word"}
    assert len(by_name["lrkd_corpus"].test_docs()) == 200
    from pydoc_data.topics import topics

    pydoc = list(by_name["lrkd_pydoc"].test_docs())
    assert by_name["lrkd_pydoc"].config.output_type == "loglikelihood_rolling"
    assert [d["topic"] for d in pydoc] == sorted(topics)
    for doc in pydoc:  # each topic's first lines, cut at a line end
        assert 0 < len(doc["text"]) <= 1500 and topics[doc["topic"]].strip().startswith(doc["text"])
    # The dataset function ignores the metadata lm-eval passes along.
    assert len(problems_dataset(num_problems=3, version=1.0)["test"]) == 3


def test_scores_and_comparison_table() -> None:
    results = {"results": {
        "lrkd_arithmetic": {"alias": "x", "acc,none": 0.25, "acc_stderr,none": 0.1},
        "lrkd_corpus": {"word_perplexity,none": 20.0, "bits_per_byte,none": 1.5,
                        "bits_per_byte_stderr,none": "N/A"},
        "gsm": {"exact_match,strict-match": 0.5},
    }}  # fmt: skip
    found = scores(results)
    assert found == {
        "lrkd_arithmetic/acc": 0.25, "lrkd_corpus/word_perplexity": 20.0,
        "lrkd_corpus/bits_per_byte": 1.5, "gsm/exact_match/strict-match": 0.5,
    }  # fmt: skip
    table = comparison_table(found, {"lrkd_arithmetic/acc": 0.5}, labels=("student", "teacher"))
    lines = table.splitlines()
    assert lines[0] == "| task/metric | student | teacher | student/teacher |"
    assert "| lrkd_arithmetic/acc | 0.25 | 0.5 | 0.5 |" in lines
    assert "| lrkd_corpus/word_perplexity | 20 | - | - |" in lines


def test_eval_cli_scores_the_completions_lrkd_generates(tmp_path, tiny_teacher_dir) -> None:
    """``lrkd eval`` on a model directory: each item's completion is the one lrkd's greedy
    generation writes (same prompt formatting, stop strings, length), and the score is lrkd's
    pass@1 of those items."""
    out = tmp_path / "eval"
    found = main(["eval", "--model", str(tiny_teacher_dir), "--tasks", "[lrkd_arithmetic]",
                  "--limit", str(LIMIT), "--output_path", str(out), "--log_samples", "true",
                  "--device", "cpu"])  # fmt: skip
    name = tiny_teacher_dir.name
    assert set(found) == {name}
    samples = json.loads((out / f"{name}.json").read_text())["samples"]["lrkd_arithmetic"]
    assert json.loads((out / "scores.json").read_text()) == found
    completions = {int(s["doc_id"]): s["filtered_resps"][0] for s in samples}
    docs = _docs(task_manager(), "lrkd_arithmetic", LIMIT)

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    prompts = [prompt_token_ids(tokenizer, d["prompt"]) for d in docs]
    rollouts = generate(
        model, prompts, num_samples=1, max_new_tokens=MAX_GEN_TOKS, temperature=0.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tokenizer=tokenizer, keys=[d["id"] for d in docs], stop=list(STOP),
    )  # fmt: skip
    assert rollouts.texts is not None
    assert [completions[i] for i in range(LIMIT)] == [t[0] for t in rollouts.texts]
    assert not any(stop in t[0] for t in rollouts.texts for stop in STOP)  # cut at a stop
    correct = count_correct(
        model, prompts, [d["answer"] for d in docs], [d["id"] for d in docs], FinalNumber(),
        tokenizer, num_samples=1, temperature=0.0, max_new_tokens=MAX_GEN_TOKS, stop=list(STOP),
    )  # fmt: skip
    assert found[name]["lrkd_arithmetic/acc"] == pytest.approx(float(correct.double().mean()))


def _fit_config(tmp_path, teacher_dir, callbacks: list, max_steps: int = 4) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": max_steps, "accelerator": "cpu", "precision": "32-true",
            "limit_val_batches": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}},
            "callbacks": callbacks,
        },
        "model": {
            "teacher": str(teacher_dir), "teacher_dtype": "float32",
            "student": {"class_path": "lrkd.models.lowrank.LowRankCloneBuilder",
                        "init_args": {"hidden_size": 32}},
            "loss": {"ce_weight": 0.5},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
        },
        "data": {"class_path": "lrkd.data.text.TextDataModule",
                 "init_args": {"seq_length": 32, "batch_size": 4, "builtin_documents": 100}},
    }  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


CALLBACK = {
    "class_path": "lrkd.callbacks.lm_eval.LMEvalCallback",
    "init_args": {"tasks": ["lrkd_arithmetic", "lrkd_corpus"], "limit": 6, "every_n_steps": 2,
                  "at_fit_start": True, "teacher": True},
}  # fmt: skip


def test_callback_logs_scores_matches_the_cli_and_leaves_training_unchanged(
    tmp_path, tiny_teacher_dir
) -> None:
    """A low-rank clone student: the callback scores at steps 0, 2 and 4, the teacher once;
    its teacher scores equal ``lrkd eval``'s on the teacher directory; TensorBoard has
    ``eval/<task>/<metric>``; and the trained weights equal those of a run without it."""
    with_cb = main(["fit", "--config", _fit_config(tmp_path / "a", tiny_teacher_dir, [CALLBACK])])
    (callback,) = [c for c in with_cb.trainer.callbacks if isinstance(c, LMEvalCallback)]
    assert [row["step"] for row in callback.history] == [0.0, 2.0, 4.0]
    first = callback.history[0]
    assert {"eval/lrkd_arithmetic/acc", "eval/lrkd_corpus/word_perplexity",
            "eval/lrkd_arithmetic/acc_teacher", "eval/lrkd_corpus/bits_per_byte_teacher",
            "eval/seconds"} <= set(first)  # fmt: skip
    assert not any(k.endswith("_teacher") for row in callback.history[1:] for k in row)
    # The student learns the corpus: its perplexity falls between step 0 and step 4.
    ppl = [row["eval/lrkd_corpus/word_perplexity"] for row in callback.history]
    assert ppl[-1] < ppl[0]

    cli = main(["eval", "--model", str(tiny_teacher_dir), "--device", "cpu", "--limit", "6",
                "--tasks", "[lrkd_arithmetic, lrkd_corpus]"])  # fmt: skip
    (teacher_scores,) = cli.values()
    for name, value in teacher_scores.items():
        assert math.isclose(first[f"eval/{name}_teacher"], value, rel_tol=1e-5), name

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((tmp_path / "a" / "runs" / "tiny").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("eval/lrkd_corpus/word_perplexity")]
    assert steps == [0, 2, 4]
    assert [e.step for e in acc.Scalars("eval/lrkd_arithmetic/acc_teacher")] == [0]

    without = main(["fit", "--config", _fit_config(tmp_path / "b", tiny_teacher_dir, [])])
    trained = with_cb.model.student.state_dict()
    for name, value in without.model.student.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0, msg=name)


def test_callback_on_a_resumed_run_keeps_the_teacher_scores() -> None:
    callback = LMEvalCallback(tasks=["lrkd_arithmetic"], teacher=True)
    state = {"teacher_scores": {"eval/lrkd_arithmetic/acc_teacher": 0.5}, "last_step": 10}
    callback.load_state_dict(state)
    assert callback.state_dict() == state


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": []}, "LMEvalCallback.tasks: give at least one task"),
        ({"tasks": ["x"], "every_n_steps": 0}, "LMEvalCallback.every_n_steps=0"),
        ({"tasks": ["x"], "at_fit_end": False}, "it would never evaluate"),
        ({"tasks": ["x"], "limit": 0}, "limit=0"),
    ],
)
def test_callback_refuses_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LMEvalCallback(**kwargs)


def test_unknown_task_is_refused_with_close_names(manager) -> None:
    with pytest.raises(ValueError, match=r"'lrkd_arithmetc' is not an lm-eval task; did you mean "
                       r"lrkd_arithmetic"):  # fmt: skip
        check_tasks(["lrkd_arithmetc"], manager)
    with pytest.raises(ValueError, match="give at least one task"):
        check_tasks([], manager)
    with pytest.raises(FileNotFoundError, match="--include_path='/no/such' is not a folder"):
        task_manager(["/no/such"])


def test_bad_task_in_a_fit_config_fails_before_training(tmp_path, tiny_teacher_dir, capsys):
    bad = {**CALLBACK, "init_args": {"tasks": ["lrkd_arithmetc"]}}
    with pytest.raises(ValueError, match=r"LMEvalCallback\.tasks: 'lrkd_arithmetc'"):
        main(["fit", "--config", _fit_config(tmp_path, tiny_teacher_dir, [bad])])


def test_a_task_whose_data_is_not_local_fails_clearly(tmp_path) -> None:
    """No Hub and an empty datasets cache: an lm-eval task that downloads its data is refused
    before any model is loaded, naming the task, the dataset and the fixes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "HF_HOME": str(tmp_path / "hf")}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", "from lrkd.cli import console_main; console_main()", "eval",
         "--model", "/does/not/matter", "--tasks", "[arc_easy]"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --tasks: task 'arc_easy' needs data that is not available")
    assert "allenai/ai2_arc" in last and "--include_path" in last and "lrkd_arithmetic" in last


def _without_lm_eval(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError


def test_without_lm_eval_the_callback_fails_at_startup_with_the_pip_command(
    tmp_path, tiny_teacher_dir, monkeypatch, capsys
) -> None:
    _without_lm_eval(monkeypatch)
    with pytest.raises(MissingDependency, match=r"pip install 'lrkd\[eval\]'"):
        LMEvalCallback(tasks=["lrkd_arithmetic"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", _fit_config(tmp_path, tiny_teacher_dir, [CALLBACK])])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: trainer.callbacks: LMEvalCallback needs lm-evaluation-harness")
    assert "pip install 'lrkd[eval]'" in last
    assert not (tmp_path / "runs").exists()  # stopped before the Trainer ran


def test_without_lm_eval_lrkd_eval_fails_with_the_pip_command(monkeypatch, capsys) -> None:
    _without_lm_eval(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["lrkd", "eval", "--model", "smollm2-135m-instruct"])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: lrkd eval needs lm-evaluation-harness") and "pip install" in last


def test_eval_of_a_checkpoint_beside_its_teacher(tmp_path, tiny_teacher_dir, capsys) -> None:
    """A checkpoint is exported on the fly; ``--compare`` prints both with the ratio."""
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}  # fmt: skip
    config = _fit_config(tmp_path, tiny_teacher_dir, [ckpt], max_steps=2)
    main(["fit", "--config", config, "--trainer.enable_checkpointing", "true"])
    capsys.readouterr()
    found = main(["eval", "--model", str(tmp_path / "ckpt" / "last.ckpt"), "--compare",
                  str(tiny_teacher_dir), "--tasks", "[lrkd_corpus]", "--limit", "4",
                  "--device", "cpu"])  # fmt: skip
    student, teacher = found
    assert student == "ckpt-last" and teacher == tiny_teacher_dir.name
    printed = capsys.readouterr().out
    a, b = (
        found[student]["lrkd_corpus/word_perplexity"],
        found[teacher]["lrkd_corpus/word_perplexity"],
    )
    assert f"| lrkd_corpus/word_perplexity | {a:.4g} | {b:.4g} | {a / b:.4g} |" in printed
    # The same scores as lm-eval on a loaded model (the callback's way).
    manager = task_manager()
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    direct = evaluate(model, ["lrkd_corpus"], manager, EvalSettings(limit=4), tokenizer=tokenizer)
    assert scores(direct)["lrkd_corpus/word_perplexity"] == pytest.approx(b, rel=1e-5)


def test_compare_with_saved_results_reads_the_scores_a_live_comparison_computes(
    tmp_path, tiny_teacher_dir, capsys
) -> None:
    """``--compare <name>.json`` (from ``--output_path``) gives the same scores and table as
    scoring that model again, and refuses results scored another way, naming the difference."""
    other = tmp_path / "other"
    make_tiny_llama(seed=1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    common = ["--tasks", "lrkd_arithmetic,lrkd_corpus", "--limit", "3", "--device", "cpu"]
    live = main(["eval", "--model", str(other), "--compare", str(tiny_teacher_dir), *common,
                 "--output_path", str(tmp_path / "live")])  # fmt: skip
    live_table = capsys.readouterr().out.split("| task/metric |")[1]
    saved = tmp_path / "live" / f"{tiny_teacher_dir.name}.json"
    read = main(["eval", "--model", str(other), "--compare", str(saved), *common,
                 "--output_path", str(tmp_path / "read")])  # fmt: skip
    printed = capsys.readouterr().out
    assert read == live and list(read) == ["other", tiny_teacher_dir.name]
    assert f"(read from {saved})" in printed
    assert printed.split("| task/metric |")[1] == live_table
    assert json.loads((tmp_path / "read" / "scores.json").read_text()) == live
    assert not (tmp_path / "read" / f"{tiny_teacher_dir.name}.json").exists()

    # Scored another way: refused, before the model's evaluation where the file tells.
    with pytest.raises(ValueError, match=r"--compare=.*--limit 3, this evaluation has --limit 2"):
        eval_command(str(other), tasks="lrkd_corpus", compare=str(saved), limit=2)
    with pytest.raises(ValueError, match=r"has no scores for lrkd_word \(it has lrkd_arit"):
        eval_command(str(other), tasks="lrkd_word", compare=str(saved), limit=3)
    changed = json.loads(saved.read_text())
    changed["versions"]["lrkd_corpus"] = 0.5
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=r"task .lrkd_corpus. has versions 0.5 there and 1.0 here"):
        eval_command(str(other), tasks="lrkd_corpus", compare=str(edited), limit=3)
    with pytest.raises(FileNotFoundError, match=r"--compare=.*no such file"):
        eval_command(str(other), compare=str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"student": {"a/acc": 1.0}}))
    with pytest.raises(ValueError, match="not lm-eval results"):
        eval_command(str(other), compare=str(tmp_path / "bad.json"))


def test_callback_refuses_models_lm_eval_cannot_run(tiny_teacher_dir) -> None:
    from lightning.pytorch import LightningModule

    class Module(LightningModule):
        def __init__(self, student, teacher) -> None:
            super().__init__()
            self.student, self.teacher, self.tokenizer = student, teacher, object()

    hf = make_tiny_llama()
    callback = LMEvalCallback(tasks=["lrkd_arithmetic"])
    with pytest.raises(TypeError, match=r"the student is a Linear\. Export it and use lrkd eval"):
        callback.setup(None, Module(torch.nn.Linear(2, 2), hf), "fit")
    with pytest.raises(TypeError, match=r"needs a LightningModule with \.student, \.teacher"):
        callback.setup(None, LightningModule(), "fit")
    with_teacher = LMEvalCallback(tasks=["lrkd_arithmetic"], teacher=True)
    with pytest.raises(TypeError, match=r"LMEvalCallback\.teacher=true needs a Hugging Face"):
        with_teacher.setup(None, Module(hf, torch.nn.Linear(2, 2)), "fit")


def test_a_task_folder_of_your_own(tmp_path, tiny_teacher_dir) -> None:
    """``--include_path``: a task YAML over a local JSONL file (the first built-in corpus
    documents of lrkd_corpus) scores what lrkd_corpus scores on those documents."""
    from lrkd.data.corpus import builtin_corpus

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_corpus(4, seed=1234)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_docs.yaml").write_text(yaml.safe_dump({
        "task": "my_docs", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "output_type": "loglikelihood_rolling", "test_split": "test",
        "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                         "higher_is_better": False}],
    }))  # fmt: skip
    found = main(["eval", "--model", str(tiny_teacher_dir), "--include_path", str(tasks),
                  "--tasks", "[my_docs, lrkd_corpus]", "--limit", "4",
                  "--device", "cpu"])  # fmt: skip
    (scored,) = found.values()
    assert scored["my_docs/word_perplexity"] == pytest.approx(
        scored["lrkd_corpus/word_perplexity"], rel=1e-6
    )
