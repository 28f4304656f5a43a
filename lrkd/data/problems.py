"""Verifiable problems: questions with a reference final answer, for pass-rate-paced data.

A :class:`Problem` is a prompt (the question, without chat formatting) and the reference final
answer as a string. The student's pass rate on a problem is estimated from its own sampled
replies, checked against ``answer`` by a verifier; an optional reference ``response`` can serve
as teacher data.

Problems come from JSONL files (:func:`read_problems`, :func:`write_problems`) or from the
built-in generator of graded arithmetic and word problems (:func:`builtin_problems`), which
needs no download. :func:`split_problems` holds out a validation set.

File format: one JSON object per line (``.jsonl``, or ``.json`` read the same way), blank lines
skipped::

    {"id": "p1", "prompt": "What is 7 * 8?", "answer": 56, "kind": "mul", "difficulty": 2}
    {"prompt": "What is 3/4 of 1?", "answer": "3/4", "response": "3/4 of 1 is 3/4."}
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrkd.data.records import jsonl_rows

KINDS: tuple[str, ...] = ("add", "sub", "mul", "word")
"""The kinds of problem :func:`builtin_problems` can generate."""

DIFFICULTIES: tuple[int, ...] = (1, 2, 3, 4, 5)
"""The difficulty levels of :func:`builtin_problems`, 1 (easiest) to 5."""


@dataclass(frozen=True)
class Problem:
    """A question with a verifiable reference answer.

    Attributes:
        id: unique within a set of problems.
        prompt: the question, without any chat formatting.
        answer: the reference final answer as a string, e.g. ``"42"``, ``"-3"`` or ``"3/4"``.
        response: an optional reference solution (used as teacher data when present).
        kind: an optional category, e.g. ``"add"``, ``"sub"``, ``"mul"`` or ``"word"``.
        difficulty: an optional level, 1 (easiest) to 5 for the built-in problems.
    """

    id: str
    prompt: str
    answer: str
    response: str | None = None
    kind: str | None = None
    difficulty: int | None = None


# ---------------------------------------------------------------------------------------------
# Files


def read_problems(
    path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer",
    response_field: str = "response", id_field: str = "id",
) -> list[Problem]:  # fmt: skip
    """Read problems from a JSONL file (``.jsonl``, or ``.json`` read as JSONL).

    Each non-blank line is a JSON object with a non-empty string prompt and an answer that is a
    string or a number (numbers become strings: ``42`` -> ``"42"``, ``3.0`` -> ``"3"``,
    ``0.5`` -> ``"0.5"``; a string answer has surrounding whitespace stripped). Optional fields:
    the id (string or integer; default ``"<file stem>:<line number>"``), the response (string or
    null), ``kind`` (string or null) and ``difficulty`` (integer or null). Other fields are
    ignored.

    Args:
        path: the file.
        prompt_field: the name of the prompt field.
        answer_field: the name of the answer field.
        response_field: the name of the optional reference-solution field.
        id_field: the name of the optional id field.

    Returns:
        The problems, in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unsupported file type, a malformed line or record (the message starts
            with ``"<path>:<line number>: "``), a duplicate id, or a file with no problems.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problem file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        raise ValueError(
            f"{path}: unsupported file type {suffix!r} for problems; use .jsonl (or .json "
            "with one JSON object per line)"
        )
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for line_no, row in jsonl_rows(path):
        where = f"{path}:{line_no}"
        problem = _problem_from_row(
            row, where, default_id=f"{path.stem}:{line_no}", prompt_field=prompt_field,
            answer_field=answer_field, response_field=response_field, id_field=id_field,
        )  # fmt: skip
        if problem.id in first_line:
            raise ValueError(
                f"{where}: duplicate id {problem.id!r} (lines {first_line[problem.id]} and "
                f"{line_no})"
            )
        first_line[problem.id] = line_no
        problems.append(problem)
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    return problems


def write_problems(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems to a JSONL file that :func:`read_problems` reads back unchanged.

    Fields that are ``None`` are left out. The parent directory is created if needed.

    Args:
        problems: the problems to write.
        path: the file to write (overwritten if it exists).

    Returns:
        The path written, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for problem in problems:
            record = {
                "id": problem.id,
                "prompt": problem.prompt,
                "answer": problem.answer,
                "response": problem.response,
                "kind": problem.kind,
                "difficulty": problem.difficulty,
            }
            record = {key: value for key, value in record.items() if value is not None}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _problem_from_row(
    row: Any, where: str, default_id: str, prompt_field: str, answer_field: str,
    response_field: str, id_field: str,
) -> Problem:  # fmt: skip
    """Check one parsed record and build its :class:`Problem` (errors start with ``where``)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_json_type(row)}")
    for field in (prompt_field, answer_field):
        if field not in row:
            raise ValueError(
                f"{where}: missing {field!r} field; the record's keys are {sorted(row)}"
            )

    prompt = row[prompt_field]
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: {prompt_field!r} must be a string, got {_json_type(prompt)}")
    if not prompt.strip():
        raise ValueError(f"{where}: {prompt_field!r} is empty")

    answer = _answer_text(row[answer_field], where, answer_field)

    response = row.get(response_field)
    if response is not None and not isinstance(response, str):
        raise ValueError(
            f"{where}: {response_field!r} must be a string or null, got {_json_type(response)}"
        )

    raw_id = row.get(id_field)
    if raw_id is None:
        problem_id = default_id
    elif isinstance(raw_id, str) and raw_id:
        problem_id = raw_id
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        problem_id = str(raw_id)
    else:
        raise ValueError(
            f"{where}: {id_field!r} must be a non-empty string or an integer, got {raw_id!r}"
        )

    kind = row.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise ValueError(f"{where}: 'kind' must be a string or null, got {_json_type(kind)}")

    difficulty = row.get("difficulty")
    if difficulty is not None and (not isinstance(difficulty, int) or isinstance(difficulty, bool)):
        raise ValueError(f"{where}: 'difficulty' must be an integer or null, got {difficulty!r}")

    return Problem(
        id=problem_id, prompt=prompt, answer=answer, response=response, kind=kind,
        difficulty=difficulty,
    )  # fmt: skip


def _answer_text(value: Any, where: str, field: str) -> str:
    """The reference answer as a string: numbers converted, strings stripped and non-empty."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: {field!r} must be a string or a number, got a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {field!r} must be a finite number, got {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: {field!r} is empty")
        return value.strip()
    raise ValueError(f"{where}: {field!r} must be a string or a number, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# The built-in generator

# Operand ranges (inclusive) per difficulty level: (first range, second range).
_ADD_RANGES: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    1: ((1, 9), (1, 9)),
    2: ((10, 20), (1, 9)),
    3: ((10, 49), (10, 49)),
    4: ((10, 99), (10, 99)),
    5: ((100, 999), (100, 999)),
}
_MUL_RANGES: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    1: ((2, 5), (2, 9)),
    2: ((2, 12), (2, 12)),
    3: ((11, 49), (2, 9)),
    4: ((11, 99), (11, 20)),
    5: ((11, 99), (11, 99)),
}

_NAMES = (
    "Tom", "Sara", "Ben", "Maya", "Leo", "Nina", "Omar", "Emma", "Hugo", "Iris", "Sam", "Rosa",
)  # fmt: skip
_THINGS = (
    "apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "stamps", "cards",
    "eggs", "oranges", "flowers",
)  # fmt: skip
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"))

# Word-problem operands: at least 2, so that every count takes a plural noun.
_WORD_ADD_RANGES: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    1: ((2, 9), (2, 9)),
    2: ((10, 20), (2, 9)),
    3: ((10, 49), (10, 49)),
    4: ((10, 49), (2, 20)),
    5: ((20, 99), (10, 49)),
}
_WORD_MUL_RANGES: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    2: ((2, 5), (2, 9)),
    3: ((2, 12), (2, 12)),
    4: ((2, 9), (2, 9)),
    5: ((2, 12), (11, 20)),
}

_MAX_RETRIES = 50


def builtin_problems(
    num_problems: int = 1000, seed: int = 0, kinds: Sequence[str] = KINDS,
    difficulties: Sequence[int] = DIFFICULTIES,
) -> list[Problem]:  # fmt: skip
    """Generate graded arithmetic and word problems with exact integer answers.

    Problem ``i`` takes the ``(kind, difficulty)`` combination ``i % n_combinations`` from a
    fixed interleaved order, so every combination occurs equally often (within one) and any
    prefix of the list is balanced over kinds. Prompts are unique within a set where the level
    has enough distinct questions (a few redraws are tried, then a repeat is accepted). The
    same arguments always give the same list; ``response`` is left ``None`` (the teacher
    answers for itself).

    Arithmetic prompts read ``"What is 23 + 45?"``, ``"What is 71 - 28?"`` and
    ``"What is 7 * 8?"`` (ASCII ``*`` for multiplication); operands of ``+`` and ``*`` come in
    either order. Operand ranges (inclusive) by difficulty:

    ===== ====================== ========================================= ======================
    level add                    sub                                       mul
    ===== ====================== ========================================= ======================
    1     1-9 + 1-9              as add, larger minus smaller              2-5 * 2-9
    2     10-20 + 1-9            as add, larger minus smaller              2-12 * 2-12
    3     10-49 + 10-49          as add, larger minus smaller              11-49 * 2-9
    4     10-99 + 10-99          as add, larger minus smaller              11-99 * 11-20
    5     100-999 + 100-999      as add; smaller minus larger half the     11-99 * 11-99
                                 time (a negative answer)
    ===== ====================== ========================================= ======================

    Word problems are short stories with names and objects drawn from small lists, and always
    have a non-negative integer answer. Levels 1-3 are one step: 1 adds or takes away with
    numbers 2-9; 2 adds or takes away (10-20 and 2-9) or multiplies/shares equally (2-5 by
    2-9); 3 the same with 10-49 and 2-12 by 2-12. Levels 4 and 5 are two steps (buy then give
    away, groups plus extras, or "more than" then a total), with numbers up to about 50 at
    level 4 and about 100 (and 11-20 groups of up to 12) at level 5.

    Args:
        num_problems: how many problems to generate (at least 1).
        seed: the random seed; ids are ``f"builtin-{seed}-{i:05d}"``.
        kinds: which kinds to generate, from ``("add", "sub", "mul", "word")``.
        difficulties: which levels to generate, from 1 to 5.

    Returns:
        The problems, with ``kind`` and ``difficulty`` set.

    Raises:
        ValueError: ``num_problems`` below 1, an empty or unknown kind or difficulty.
    """
    if isinstance(num_problems, bool) or not isinstance(num_problems, int) or num_problems < 1:
        raise ValueError(f"num_problems must be an integer >= 1, got {num_problems!r}")
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(dict.fromkeys(kinds))
    difficulties = tuple(dict.fromkeys(difficulties))
    if not kinds or any(kind not in KINDS for kind in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}, got {list(kinds)}")
    if not difficulties or any(
        isinstance(level, bool) or level not in DIFFICULTIES for level in difficulties
    ):
        raise ValueError(
            f"difficulties must be a non-empty subset of {list(DIFFICULTIES)}, got "
            f"{list(difficulties)}"
        )

    # Interleaved order: consecutive combinations change kind every step and difficulty every
    # row, so a prefix of any length is balanced over kinds.
    n_kinds, n_levels = len(kinds), len(difficulties)
    combos = [
        (kinds[j % n_kinds], difficulties[(j // n_kinds + j % n_kinds) % n_levels])
        for j in range(n_kinds * n_levels)
    ]

    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    for i in range(num_problems):
        kind, level = combos[i % len(combos)]
        make = _GENERATORS[kind]
        for _ in range(_MAX_RETRIES):
            prompt, answer = make(rng, level)
            if prompt not in seen:
                break
        seen.add(prompt)
        problems.append(
            Problem(
                id=f"builtin-{seed}-{i:05d}",
                prompt=prompt,
                answer=str(answer),
                kind=kind,
                difficulty=level,
            )
        )
    return problems


def _operands(
    rng: random.Random, ranges: tuple[tuple[int, int], tuple[int, int]], swap: bool
) -> tuple[int, int]:
    """Draw one operand from each range, in random order when ``swap``."""
    (lo_a, hi_a), (lo_b, hi_b) = ranges
    a, b = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)
    if swap and rng.random() < 0.5:
        a, b = b, a
    return a, b


def _add(rng: random.Random, level: int) -> tuple[str, int]:
    a, b = _operands(rng, _ADD_RANGES[level], swap=True)
    return f"What is {a} + {b}?", a + b


def _sub(rng: random.Random, level: int) -> tuple[str, int]:
    a, b = _operands(rng, _ADD_RANGES[level], swap=False)
    a, b = max(a, b), min(a, b)
    if level == 5 and rng.random() < 0.5:
        a, b = b, a
    return f"What is {a} - {b}?", a - b


def _mul(rng: random.Random, level: int) -> tuple[str, int]:
    a, b = _operands(rng, _MUL_RANGES[level], swap=True)
    return f"What is {a} * {b}?", a * b


def _word(rng: random.Random, level: int) -> tuple[str, int]:
    name = rng.choice(_NAMES)
    thing = rng.choice(_THINGS)
    one, many = rng.choice(_CONTAINERS)
    if level == 1:
        template = rng.choice(("add", "sub"))
    elif level <= 3:
        template = rng.choice(("add", "sub", "groups", "share"))
    else:
        template = rng.choice(("buy_give", "groups_plus", "more_than"))

    if template in ("add", "sub"):
        a, b = _operands(rng, _WORD_ADD_RANGES[level], swap=False)
        if template == "add":
            return (
                f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?",
                a + b,
            )
        a, b = max(a, b), min(a, b)
        return (
            f"{name} had {a} {thing} and gave {b} to a friend. How many {thing} does {name} "
            "have left?",
            a - b,
        )
    if template in ("groups", "share"):
        size, count = _operands(rng, _WORD_MUL_RANGES[level], swap=True)
        if template == "groups":
            return (
                f"A {one} holds {size} {thing}. How many {thing} are in {count} {many}?",
                size * count,
            )
        return (
            f"{name} shares {size * count} {thing} equally among {count} friends. How many "
            f"{thing} does each friend get?",
            size,
        )
    if template == "buy_give":
        a, b = _operands(rng, _WORD_ADD_RANGES[level], swap=False)
        c = rng.randint(2, a + b - 1)
        return (
            f"{name} has {a} {thing}, buys {b} more and then gives {c} away. How many {thing} "
            f"does {name} have now?",
            a + b - c,
        )
    if template == "groups_plus":
        size, count = _operands(rng, _WORD_MUL_RANGES[level], swap=True)
        extra = rng.randint(*_WORD_ADD_RANGES[level][1])
        return (
            f"{name} buys {count} {many} with {size} {thing} in each {one} and already had "
            f"{extra} {thing}. How many {thing} does {name} have in total?",
            count * size + extra,
        )
    friend = rng.choice([other for other in _NAMES if other != name])
    a, b = _operands(rng, _WORD_ADD_RANGES[level], swap=False)
    return (
        f"{name} has {a} {thing} and {friend} has {b} more {thing} than {name}. How many "
        f"{thing} do they have together?",
        a + (a + b),
    )


_GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, int]]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "word": _word,
}


# ---------------------------------------------------------------------------------------------
# Held-out evaluation sets

#: The built-in problem sets that ``lrkd eval`` scores (lm-eval tasks of the same names,
#: ``lrkd/evaluation/tasks/*.yaml``): :func:`builtin_problems` arguments.
EVAL_SETS: dict[str, dict[str, Any]] = {
    "lrkd_arithmetic": {"kinds": ["add", "sub", "mul"], "num_problems": 250, "seed": 1234},
    "lrkd_word": {"kinds": ["word"], "num_problems": 250, "seed": 1234},
}


def excluded_prompts(sources: Sequence[str], field: str = "data.exclude") -> set[str]:
    """The prompts of problem sets that training data must not contain.

    Args:
        sources: JSONL problem files, or names of the built-in evaluation sets
            (:data:`EVAL_SETS`: ``lrkd_arithmetic``, ``lrkd_word``).
        field: the config field, named in error messages.

    Returns:
        Every prompt of those sets, stripped of surrounding white space.

    Raises:
        FileNotFoundError: a source is neither a set's name nor an existing file.
    """
    prompts: set[str] = set()
    for source in sources:
        if source in EVAL_SETS:
            spec = EVAL_SETS[source]
            problems = builtin_problems(spec["num_problems"], spec["seed"], spec["kinds"])
        elif Path(source).is_file():
            problems = read_problems(source)
        else:
            raise FileNotFoundError(
                f"{field}: {source!r} is neither a problem file nor a built-in evaluation set "
                f"({', '.join(EVAL_SETS)})"
            )
        prompts.update(p.prompt.strip() for p in problems)
    return prompts


# ---------------------------------------------------------------------------------------------
# Splitting


def split_problems(
    problems: Sequence[Problem], val_fraction: float, seed: int = 0
) -> tuple[list[Problem], list[Problem]]:
    """Split problems at random into a training and a validation set.

    The validation set has ``round(len(problems) * val_fraction)`` problems, at least 1 when
    ``val_fraction > 0`` and there are at least 2 problems, and never all of them (the training
    set keeps at least one). Both sets keep the input order.

    Args:
        problems: the problems to split.
        val_fraction: the share held out for validation, in ``[0, 1)``.
        seed: the same seed always gives the same split.

    Returns:
        ``(train, val)``.

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)``.
    """
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0 <= val_fraction < 1
    ):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(problems)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(max(round(n * val_fraction), 1), n - 1)
    val_indices = set(random.Random(seed).sample(range(n), n_val))
    train = [p for i, p in enumerate(problems) if i not in val_indices]
    val = [p for i, p in enumerate(problems) if i in val_indices]
    return train, val
