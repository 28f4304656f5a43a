"""lrkd's calls into lm-evaluation-harness (``lm_eval``, the optional ``eval`` extra): find and
load tasks, evaluate a model, read the scores.

Everything that touches ``lm_eval`` goes through this module, so that the core install does not
need it and a missing install fails early with the pip command (:func:`require_lm_eval`).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrkd.errors import MissingDependency
from lrkd.evaluation.builtin import BUILTIN_TASKS, TASKS_DIR

__all__ = [
    "PIP_COMMAND",
    "EvalSettings",
    "check_tasks",
    "comparison_table",
    "evaluate",
    "require_lm_eval",
    "scores",
    "task_manager",
]

#: The command that installs lm-evaluation-harness for lrkd.
PIP_COMMAND = "pip install 'lrkd[eval]'  (or: pip install 'lm-eval>=0.4.13')"

_HUB_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "DatasetNotFoundError")


def require_lm_eval(what: str) -> None:
    """Raise unless ``lm_eval`` can be imported.

    Args:
        what: what needs it, starting the message (e.g. ``"lrkd eval"``).

    Raises:
        MissingDependency: naming ``what`` and :data:`PIP_COMMAND`.
    """
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise MissingDependency(
            f"{what} needs lm-evaluation-harness (the lm_eval package), which is not installed; "
            f"install it with: {PIP_COMMAND}"
        ) from err


@dataclass(frozen=True)
class EvalSettings:
    """How lm-eval runs the tasks.

    Attributes:
        batch_size: sequences per forward pass.
        limit: evaluate only the first this many items of each task (``None``: all).
        num_fewshot: few-shot examples per prompt (``None``: each task's own).
        apply_chat_template: give each prompt as a user turn of the tokenizer's chat template
            (when it has one): right for an instruct teacher and its students.
        log_samples: keep every item's prompt, completion and score in the results
            (``samples``).
    """

    batch_size: int = 8
    limit: int | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = True
    log_samples: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: give at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: give at least 1, or leave it out for all")


def task_manager(include_path: Sequence[str] = (), field: str = "--include_path") -> Any:
    """lm-eval's task index over its own tasks, lrkd's built-in tasks and ``include_path``.

    Raises:
        FileNotFoundError: an ``include_path`` entry that is not a folder (names ``field``).
    """
    from lm_eval.tasks import TaskManager

    for path in include_path:
        if not Path(path).expanduser().is_dir():
            raise FileNotFoundError(f"{field}={path!r} is not a folder of task YAML files")
    paths = [str(TASKS_DIR), *(str(Path(p).expanduser()) for p in include_path)]
    with _quiet():
        return TaskManager(include_path=paths)


def check_tasks(tasks: Sequence[str], manager: Any, field: str = "--tasks") -> None:
    """Load every task once, so that a bad name or missing data fails before any model work.

    Raises:
        ValueError: an empty list, an unknown task (with the closest names), or a task whose
            data is neither in the local cache nor reachable (names the task and the fix).
    """
    if not tasks:
        raise ValueError(f"{field}: give at least one task, e.g. {BUILTIN_TASKS[0]}")
    known = manager.all_tasks
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"{field}: {name!r} is not an lm-eval task{hint} lrkd's built-in tasks (no "
                f"download): {', '.join(BUILTIN_TASKS)}; a task of your own: --include_path "
                "FOLDER_OF_TASK_YAMLS"
            )
    for name in tasks:
        try:
            with _quiet():
                manager.load([name])
        except Exception as err:
            reason = _missing_data(err)
            if reason is None:
                raise
            raise ValueError(
                f"{field}: task {name!r} needs data that is not available on this machine "
                f"({reason}). Download it once where the Hugging Face Hub is reachable "
                "(lm_eval --tasks NAME --limit 1, or datasets.load_dataset) and copy the "
                "datasets cache here (HF_DATASETS_CACHE), or use a task with local data "
                f"(lrkd's built-in: {', '.join(BUILTIN_TASKS)}; your own: --include_path)"
            ) from err


def _missing_data(error: BaseException) -> str | None:
    """The message of the Hub/cache error in ``error``'s chain, or ``None`` when there is none."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError) or type(current).__name__ in _HUB_ERRORS:
            return " ".join(str(current).split()) or type(current).__name__
        current = current.__cause__ or current.__context__
    return None


def evaluate(
    model: str | Any,
    tasks: Sequence[str],
    manager: Any,
    settings: EvalSettings,
    *,
    tokenizer: Any = None,
    device: str | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Evaluate a model on ``tasks`` with lm-eval's ``simple_evaluate``.

    Args:
        model: a Hugging Face model directory (or hub id), or a loaded ``PreTrainedModel`` (then
            ``tokenizer`` is required and the model stays on its device and dtype).
        tasks: task names (:func:`check_tasks` them first).
        manager: from :func:`task_manager`.
        settings: batch size, limit, few-shot, chat template, samples.
        tokenizer: the tokenizer of a loaded model.
        device: for a directory: ``cpu``, ``cuda``, ``cuda:1``...; ``None``: CUDA when present.
        dtype: for a directory: ``auto`` (the dtype it was saved in), ``float32``,
            ``bfloat16`` or ``float16``.

    Returns:
        lm-eval's results dictionary (``results``, ``configs``, ``n-shot``, ... and with
        ``log_samples`` the ``samples``).
    """
    import lm_eval

    common: dict[str, Any] = {
        "tasks": list(tasks),
        "task_manager": manager,
        "num_fewshot": settings.num_fewshot,
        "limit": settings.limit,
        "apply_chat_template": settings.apply_chat_template,
        "log_samples": settings.log_samples,
        "bootstrap_iters": 1000,
    }
    if isinstance(model, str):
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_args = {"pretrained": model, "dtype": dtype}
        run = dict(model="hf", model_args=model_args, batch_size=settings.batch_size, device=device)
    else:
        from lm_eval.models.huggingface import HFLM

        if tokenizer is None:
            raise ValueError("evaluate: a loaded model needs its tokenizer")
        with _quiet():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
        run = {"model": lm}
    with _quiet():
        results = lm_eval.simple_evaluate(**run, **common)
    if results is None:  # lm-eval returns None on ranks other than 0
        raise RuntimeError("lm-eval returned no results (not rank 0 of its own launch?)")
    return results


#: lm-eval warnings that say nothing about the evaluation when lrkd passes a loaded model.
_EXPECTED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


def _unexpected(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_EXPECTED)


@contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO chatter (task configs, seeds, per-request notes) down to warnings, its
    task module's warnings (a note on every task with generated data) down to errors, and the
    warnings about passing a loaded model left out."""
    wanted = {"lm-eval": logging.WARNING, "lm_eval": logging.WARNING,
              "lm_eval.api.task": logging.ERROR}  # fmt: skip
    loggers = [logging.getLogger(name) for name in wanted]
    levels = [logger.level for logger in loggers]
    for logger, level in zip(loggers, wanted.values(), strict=True):
        logger.setLevel(max(logger.getEffectiveLevel(), level))
    model_logger = logging.getLogger("lm_eval.models.huggingface")
    model_logger.addFilter(_unexpected)
    try:
        yield
    finally:
        model_logger.removeFilter(_unexpected)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def scores(results: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of lm-eval ``results`` as ``{"<task>/<metric>": value}`` (a filter
    other than ``none`` is appended: ``<task>/<metric>/<filter>``; standard errors left out)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, where = key.partition(",")
            if not comma or metric.endswith("_stderr"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric}" if where == "none" else f"{task}/{metric}/{where}"
            out[name] = float(value)
    return out


def comparison_table(
    first: dict[str, float], second: dict[str, float], labels: Sequence[str]
) -> str:
    """A Markdown table of two models' scores side by side, with the ratio first / second.

    Args:
        first: :func:`scores` of the first model (e.g. the student).
        second: :func:`scores` of the second (e.g. the teacher).
        labels: the two column names.
    """
    a, b = labels
    rows = [f"| task/metric | {a} | {b} | {a}/{b} |", "|---|---:|---:|---:|"]
    for name in sorted(set(first) | set(second)):
        x, y = first.get(name), second.get(name)
        ratio = x / y if x is not None and y not in (None, 0) else math.nan
        rows.append(f"| {name} | {_number(x)} | {_number(y)} | {_number(ratio)} |")
    return "\n".join(rows)


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4g}"
