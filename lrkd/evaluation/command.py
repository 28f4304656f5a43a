"""``lrkd eval``: lm-evaluation-harness on an exported student, a checkpoint or a teacher, and
optionally a second model side by side."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrkd.evaluation.harness import (
    EvalSettings,
    check_tasks,
    comparison_table,
    evaluate,
    require_lm_eval,
    scores,
    task_manager,
)
from lrkd.models.teachers import resolve_model_path

log = logging.getLogger("lrkd")

__all__ = ["SavedResults", "eval_command", "model_directory"]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def eval_command(
    model: str,
    tasks: list[str] | str = "lrkd_arithmetic",
    compare: str | None = None,
    include_path: list[str] | str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    apply_chat_template: bool = True,
    device: str | None = None,
    dtype: str = "auto",
    teacher: str | None = None,
    output_path: str | None = None,
    log_samples: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate a model with lm-evaluation-harness, and optionally compare it with another.

    Prints lm-eval's table for each model and, with ``--compare``, both side by side with the
    ratio; ``--output_path`` also writes lm-eval's results as JSON. Needs the ``eval`` extra
    (``pip install 'lrkd[eval]'``). Offline, use lrkd's built-in tasks (``lrkd_arithmetic``,
    ``lrkd_word``: generated problems scored by their final number; ``lrkd_corpus``: perplexity
    on held-out built-in documents), task YAML folders (``--include_path``), or lm-eval tasks
    whose data is already in the local datasets cache. See docs/evaluate.md.

    Args:
        model: what to evaluate: an exported student or any Hugging Face model directory, a
            ``lrkd fit`` checkpoint (file, or sharded folder; exported on the fly), a built-in
            teacher name (e.g. ``smollm2-135m-instruct``) or a hub id.
        tasks: lm-eval task names: a list (``"[lrkd_arithmetic, lrkd_corpus]"``) or one string,
            comma-separated as lm-eval's own command takes them (``lrkd_arithmetic,hellaswag``).
        compare: a second model (same forms as ``model``), e.g. the teacher; both are scored on
            the same items and shown side by side with the ratio model / compare. Or the
            ``<name>.json`` that ``--output_path`` wrote for a model scored earlier: its scores
            are read instead of computed again, once they are checked to be for the same
            tasks, task versions, items and few-shot counts as ``model``'s (lm-eval's results
            do not record ``--apply_chat_template``: that one is not checked).
        include_path: a folder of task YAML files of your own, or a list of them.
        limit: evaluate only the first this many items of each task (``None``: all).
        batch_size: sequences per forward pass.
        num_fewshot: few-shot examples per prompt (``None``: each task's own).
        apply_chat_template: give prompts as a user turn of the model's chat template (when it
            has one), as lrkd's pass-rate rollouts do; ``false`` for a base model.
        device: ``cpu``, ``cuda``, ``cuda:1``...; ``None``: CUDA when present, else CPU.
        dtype: weights dtype: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
        teacher: for a checkpoint, load its teacher from here instead of the location recorded
            in it (as ``lrkd export --teacher``).
        output_path: a folder to write ``<name>.json`` (lm-eval's results per model) and
            ``scores.json`` (every model's ``task/metric`` scores).
        log_samples: keep every item's prompt, completion and score in the JSON.

    Returns:
        ``{name: {"<task>/<metric>": value}}`` per evaluated model.
    """
    require_lm_eval("lrkd eval")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype={dtype!r}; choose {', '.join(_DTYPES)}")
    settings = EvalSettings(
        batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template, log_samples=log_samples,
    )  # fmt: skip
    tasks = _as_list(tasks)
    manager = task_manager(_as_list(include_path))
    check_tasks(tasks, manager)
    saved = None
    if compare is not None and compare.endswith(".json"):
        saved = SavedResults.read(compare)
        saved.check(tasks, limit)  # before the model's evaluation, which may take long
    refs = {"--model": model} | ({"--compare": compare} if compare and saved is None else {})
    names = _names([model] if compare is None else [model, compare])
    out = Path(output_path).expanduser() if output_path else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    from lm_eval.utils import make_table

    found: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lrkd-eval-") as tmp:
        for (field, ref), name in zip(refs.items(), names, strict=False):
            directory = model_directory(ref, field, teacher, Path(tmp) / name)
            log.warning("lrkd: evaluating %s (%s) on %s", name, directory, ", ".join(tasks))
            results = evaluate(directory, tasks, manager, settings, device=device, dtype=dtype)
            found[name] = scores(results)
            print(f"\n{name}:\n{make_table(results)}")
            if out is not None:
                _write_json(out / f"{name}.json", results)
            if saved is not None:  # checked against what the model was just scored on
                earlier = saved.matching(results)
                found[names[1]] = scores(earlier)
                print(f"\n{names[1]} (read from {compare}):\n{make_table(earlier)}")
    if len(found) == 2:
        print(comparison_table(*found.values(), labels=names))
    if out is not None:
        _write_json(out / "scores.json", found)
        log.warning("lrkd: wrote the results to %s", out)
    return found


@dataclass(frozen=True)
class SavedResults:
    """lm-eval results of a model scored earlier, as ``lrkd eval --output_path`` writes them.

    Attributes:
        path: the ``<name>.json`` file (for messages).
        results: its content.
    """

    path: str
    results: dict[str, Any]

    @classmethod
    def read(cls, path: str) -> SavedResults:
        """Read ``--compare``'s file, refused clearly when it is not lm-eval's results."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"--compare={path}: no such file (give the <name>.json that "
                                    "lrkd eval --output_path wrote, or a model)")  # fmt: skip
        try:
            content = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--compare={path}: not JSON ({error})") from None
        if not isinstance(content, dict) or not isinstance(content.get("results"), dict):
            raise ValueError(f"--compare={path}: not lm-eval results (no 'results'); give the "
                             "<name>.json that lrkd eval --output_path wrote")  # fmt: skip
        return cls(path, content)

    def check(self, tasks: list[str], limit: int | None) -> None:
        """Refuse results without one of ``tasks`` or scored with another ``--limit``.

        Raises:
            ValueError: naming ``--compare``, what differs and the fix.
        """
        saved_limit = self.results.get("config", {}).get("limit")
        if saved_limit != limit:
            raise ValueError(f"--compare={self.path}: scored with --limit {saved_limit}, this "
                             f"evaluation has --limit {limit}; {_RESCORE}")  # fmt: skip
        missing = [task for task in tasks if task not in self.results["results"]]
        if missing:
            have = ", ".join(sorted(self.results["results"])) or "none"
            raise ValueError(f"--compare={self.path}: has no scores for {', '.join(missing)} "
                             f"(it has {have}); {_RESCORE}")  # fmt: skip

    def matching(self, fresh: dict[str, Any]) -> dict[str, Any]:
        """The saved results of the tasks in ``fresh`` (lm-eval's results of the model just
        scored), after checking that each was scored the same way: the same task version and
        the same numbers of items and of few-shot examples.

        Raises:
            ValueError: naming ``--compare``, the task and what differs.
        """
        picked: dict[str, Any] = {key: {} for key in _PER_TASK}
        for task in fresh["results"]:
            for key in ("versions", "n-shot", "n-samples"):
                want, got = fresh.get(key, {}).get(task), self.results.get(key, {}).get(task)
                if want != got:
                    raise ValueError(f"--compare={self.path}: task {task!r} has {key} {got} "
                                     f"there and {want} here; {_RESCORE}")  # fmt: skip
            for key in _PER_TASK:
                if task in self.results.get(key, {}):
                    picked[key][task] = self.results[key][task]
        return picked


#: The per-task parts of lm-eval's results that a comparison reads.
_PER_TASK = ("results", "versions", "n-shot", "n-samples", "higher_is_better")
_RESCORE = "score the model again instead: --compare <its directory or name>"


def model_directory(ref: str, field: str, teacher: str | None, scratch: Path) -> str:
    """A model reference as something lm-eval loads: a checkpoint is exported into
    ``scratch`` first; a directory, built-in name or hub id is resolved as ``model.teacher``."""
    path = Path(ref).expanduser()
    checkpoint = path.is_file() or (path.is_dir() and (path / "meta.pt").is_file())
    if checkpoint:
        from lrkd.export import export

        return str(export(str(path), str(scratch), teacher=teacher))
    return resolve_model_path(ref, field=field)


def _names(refs: list[str]) -> list[str]:
    """Short, distinct names of the models for tables and files."""
    names = []
    for ref in refs:
        path = Path(ref)
        parts = [p for p in path.parts if p not in ("/", ".", "..")]
        if path.suffix == ".json":  # saved results: runs/eval/teacher.json -> teacher
            name = path.stem
        elif path.suffix == ".ckpt":  # runs/quickstart/checkpoints/last.ckpt -> quickstart-last
            folders = parts[:-1]
            if folders and folders[-1] == "checkpoints":
                folders = folders[:-1]
            name = "-".join([*folders[-1:], path.stem])
        else:
            name = parts[-1] if parts else ref
        names.append(name or "model")
    if len(names) == 2 and names[0] == names[1]:
        names = ["model", "compare"]
    return names


def _as_list(value: list[str] | str | None) -> list[str]:
    """A list argument that may also be given as one comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return list(value)


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2, default=str) + "\n")
