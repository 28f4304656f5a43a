"""Verifiable problems: the JSONL format and its errors, the graded built-in generator, splits."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lrkd.data.problems import (
    DIFFICULTIES,
    KINDS,
    Problem,
    builtin_problems,
    read_problems,
    split_problems,
    write_problems,
)

_ARITHMETIC = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")

# Operand ranges per level, as documented in builtin_problems (sub uses the add ranges).
_ADD_RANGES = {
    1: ((1, 9), (1, 9)),
    2: ((10, 20), (1, 9)),
    3: ((10, 49), (10, 49)),
    4: ((10, 99), (10, 99)),
    5: ((100, 999), (100, 999)),
}
_MUL_RANGES = {
    1: ((2, 5), (2, 9)),
    2: ((2, 12), (2, 12)),
    3: ((11, 49), (2, 9)),
    4: ((11, 99), (11, 20)),
    5: ((11, 99), (11, 99)),
}


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _parse(prompt: str) -> tuple[int, str, int]:
    match = _ARITHMETIC.match(prompt)
    assert match, f"unexpected arithmetic prompt {prompt!r}"
    return int(match.group(1)), match.group(2), int(match.group(3))


def _within(value: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= value <= bounds[1]


# ---------------------------------------------------------------------------------------------
# Files


def test_write_read_round_trip(tmp_path) -> None:
    problems = [
        Problem(id="a", prompt="What is 2 + 2?", answer="4", kind="add", difficulty=1),
        Problem(id="b", prompt="Half of 3/2?", answer="3/4", response="It is 3/4."),
        Problem(id="c", prompt="Naïve café ✓?", answer="-3"),
    ]
    path = write_problems(problems, tmp_path / "sub" / "p.jsonl")
    assert path == tmp_path / "sub" / "p.jsonl"
    assert read_problems(path) == problems
    # None fields are left out of the file.
    first, second, third = (json.loads(line) for line in path.read_text("utf-8").splitlines())
    assert set(first) == {"id", "prompt", "answer", "kind", "difficulty"}
    assert set(second) == {"id", "prompt", "answer", "response"}
    assert set(third) == {"id", "prompt", "answer"}


def test_builtin_round_trip(tmp_path) -> None:
    problems = builtin_problems(60, seed=2)
    assert read_problems(write_problems(problems, tmp_path / "b.jsonl")) == problems


def test_numeric_answers_ids_and_defaults(tmp_path) -> None:
    path = _write_lines(
        tmp_path / "nums.jsonl",
        [
            '{"id": 7, "prompt": "p1", "answer": 42}',
            "",
            '{"prompt": "p2", "answer": 3.0, "extra": [1, 2]}',
            '{"id": "x", "prompt": "p3", "answer": 0.75, "response": null, "kind": null}',
            '{"id": -1, "prompt": "p4", "answer": -3, "difficulty": 4, "kind": "mul"}',
            '{"prompt": "p5", "answer": "  12 \\n"}',
        ],
    )
    problems = read_problems(path)
    assert [p.id for p in problems] == ["7", "nums:3", "x", "-1", "nums:6"]
    assert [p.answer for p in problems] == ["42", "3", "0.75", "-3", "12"]
    assert problems[3].difficulty == 4 and problems[3].kind == "mul"
    assert problems[2].response is None and problems[2].kind is None


def test_custom_field_names_and_json_suffix(tmp_path) -> None:
    path = _write_lines(
        tmp_path / "custom.json",
        ['{"uid": "q1", "question": "What is 1 + 1?", "final": "2", "solution": "1 + 1 = 2"}'],
    )
    problems = read_problems(
        path, prompt_field="question", answer_field="final", response_field="solution",
        id_field="uid",
    )  # fmt: skip
    assert problems == [Problem(id="q1", prompt="What is 1 + 1?", answer="2", response="1 + 1 = 2")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "answer": ', "malformed JSON"),
        ('["prompt", "answer"]', "expected a JSON object, got an array"),
        ('"just a string"', "expected a JSON object, got a string"),
        ('{"answer": "1", "id": "z"}', "missing 'prompt' field; the record's keys are ['answer',"),
        ('{"prompt": "p", "response": "r"}', "missing 'answer' field; the record's keys are"),
        ('{"prompt": 5, "answer": "1"}', "'prompt' must be a string, got a number"),
        ('{"prompt": "p", "answer": [1]}', "'answer' must be a string or a number, got an array"),
        ('{"prompt": "p", "answer": null}', "'answer' must be a string or a number, got null"),
        ('{"prompt": "p", "answer": true}', "'answer' must be a string or a number, got a boolean"),
        ('{"prompt": "p", "answer": "  "}', "'answer' is empty"),
        ('{"prompt": "p", "answer": "1", "response": 3}', "'response' must be a string or null"),
        ('{"prompt": "p", "answer": "1", "difficulty": "hard"}', "'difficulty' must be an integer"),
        ('{"prompt": "p", "answer": "1", "difficulty": 2.5}', "'difficulty' must be an integer"),
        ('{"prompt": "p", "answer": "1", "difficulty": true}', "'difficulty' must be an integer"),
        ('{"prompt": "p", "answer": "1", "kind": 3}', "'kind' must be a string or null"),
        ('{"prompt": "p", "answer": "1", "id": 1.5}', "'id' must be a non-empty string or an"),
        ('{"prompt": "p", "answer": "1", "id": ""}', "'id' must be a non-empty string or an"),
        ('{"prompt": "   ", "answer": "1"}', "'prompt' is empty"),
    ],
)  # fmt: skip
def test_malformed_record_names_file_and_line(tmp_path, line: str, message: str) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", ['{"prompt": "ok", "answer": "1"}', "", line])
    with pytest.raises(ValueError) as info:
        read_problems(path)
    assert f"{path}:3: " in str(info.value)
    assert message in str(info.value)


def test_non_finite_float_answer_is_rejected(tmp_path) -> None:
    path = _write_lines(tmp_path / "nan.jsonl", ['{"prompt": "p", "answer": NaN}'])
    with pytest.raises(ValueError, match="must be a finite number") as info:
        read_problems(path)
    assert f"{path}:1: " in str(info.value)


def test_missing_answer_under_custom_name(tmp_path) -> None:
    path = _write_lines(tmp_path / "c.jsonl", ['{"prompt": "p", "answer": "1"}'])
    with pytest.raises(ValueError) as info:
        read_problems(path, answer_field="final")
    assert f"{path}:1: missing 'final' field" in str(info.value)
    assert "['answer', 'prompt']" in str(info.value)


def test_duplicate_ids_name_both_lines(tmp_path) -> None:
    path = _write_lines(
        tmp_path / "dup.jsonl",
        [
            '{"id": "a", "prompt": "p1", "answer": "1"}',
            '{"id": "b", "prompt": "p2", "answer": "2"}',
            "",
            '{"id": "a", "prompt": "p3", "answer": "3"}',
        ],
    )
    with pytest.raises(ValueError) as info:
        read_problems(path)
    message = str(info.value)
    assert f"{path}:4: " in message
    assert "duplicate id 'a'" in message and "lines 1 and 4" in message


def test_int_and_string_ids_collide(tmp_path) -> None:
    path = _write_lines(
        tmp_path / "dup.jsonl",
        ['{"id": 5, "prompt": "p1", "answer": "1"}', '{"id": "5", "prompt": "p2", "answer": "2"}'],
    )
    with pytest.raises(ValueError, match="duplicate id '5' \\(lines 1 and 2\\)"):
        read_problems(path)


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_problems(path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_file_without_problems(tmp_path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="no problems") as info:
        read_problems(path)
    assert str(path) in str(info.value)


def test_unsupported_suffix(tmp_path) -> None:
    path = tmp_path / "p.txt"
    path.write_text('{"prompt": "p", "answer": "1"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        read_problems(path)


# ---------------------------------------------------------------------------------------------
# The built-in generator


def test_builtin_is_deterministic_and_seeded() -> None:
    a = builtin_problems(200, seed=3)
    assert a == builtin_problems(200, seed=3)
    b = builtin_problems(200, seed=4)
    assert [p.prompt for p in a] != [p.prompt for p in b]
    assert [p.id for p in a[:2]] == ["builtin-3-00000", "builtin-3-00001"]
    assert len({p.id for p in a}) == len(a)
    # A shorter list is a prefix of a longer one with the same seed.
    assert builtin_problems(50, seed=3) == a[:50]


def test_builtin_is_balanced() -> None:
    problems = builtin_problems(1000)
    assert len(problems) == 1000
    assert Counter(p.kind for p in problems) == dict.fromkeys(KINDS, 250)
    assert Counter(p.difficulty for p in problems) == dict.fromkeys(DIFFICULTIES, 200)
    combos = Counter((p.kind, p.difficulty) for p in problems)
    assert len(combos) == 20 and set(combos.values()) == {50}
    # Any prefix is balanced over kinds to within one.
    for n in (1, 7, 13, 33):
        counts = Counter(p.kind for p in problems[:n])
        assert max(counts.values()) - min(counts.get(k, 0) for k in KINDS) <= 1


def test_builtin_subset_of_kinds_and_difficulties() -> None:
    problems = builtin_problems(30, seed=1, kinds=["mul", "word"], difficulties=[2, 5])
    combos = Counter((p.kind, p.difficulty) for p in problems)
    assert set(combos) == {("mul", 2), ("mul", 5), ("word", 2), ("word", 5)}
    assert max(combos.values()) - min(combos.values()) <= 1


def test_builtin_prompts_repeat_only_when_a_level_runs_out() -> None:
    problems = builtin_problems(1000)
    counts = Counter(p.prompt for p in problems)
    repeated = {(p.kind, p.difficulty) for p in problems if counts[p.prompt] > 1}
    # 50 problems per combination; level-1 subtraction has only 45 distinct questions, level-1
    # multiplication 48 (shared with level 2). Everything else is unique.
    assert repeated <= {("sub", 1), ("mul", 1), ("mul", 2)}
    assert len({p.prompt for p in problems if (p.kind, p.difficulty) == ("sub", 1)}) == 45
    assert len(counts) >= 975


def test_builtin_arithmetic_answers_and_ranges() -> None:
    problems = builtin_problems(2000, seed=5, kinds=["add", "sub", "mul"])
    negative_level5 = 0
    for p in problems:
        a, op, b = _parse(p.prompt)
        assert op == {"add": "+", "sub": "-", "mul": "*"}[p.kind]
        assert p.answer == str({"+": a + b, "-": a - b, "*": a * b}[op])
        assert p.response is None
        first, second = (_MUL_RANGES if op == "*" else _ADD_RANGES)[p.difficulty]
        assert (_within(a, first) and _within(b, second)) or (
            _within(b, first) and _within(a, second)
        ), p
        if op == "-":
            if p.difficulty < 5:
                assert int(p.answer) >= 0, p
            else:
                negative_level5 += int(p.answer) < 0
    n_sub5 = sum(p.kind == "sub" and p.difficulty == 5 for p in problems)
    assert 0.3 * n_sub5 < negative_level5 < 0.7 * n_sub5


def test_builtin_operands_cover_their_ranges() -> None:
    problems = builtin_problems(3000, seed=0, kinds=["add", "mul"])
    for kind, ranges in (("add", _ADD_RANGES), ("mul", _MUL_RANGES)):
        for level, (first, second) in ranges.items():
            operands = [
                _parse(p.prompt) for p in problems if p.kind == kind and p.difficulty == level
            ]
            values = {a for a, _, _ in operands} | {b for _, _, b in operands}
            low, high = min(first[0], second[0]), max(first[1], second[1])
            slack = (high - low) // 10
            assert min(values) <= low + slack and max(values) >= high - slack, (kind, level)


def test_builtin_word_problems() -> None:
    problems = builtin_problems(1000, seed=9, kinds=["word"])
    assert {p.difficulty for p in problems} == set(DIFFICULTIES)
    for p in problems:
        assert p.kind == "word"
        assert p.answer.isdigit() and str(int(p.answer)) == p.answer, p
        assert p.prompt.endswith("?") and not _ARITHMETIC.match(p.prompt)
        numbers = [int(n) for n in re.findall(r"\d+", p.prompt)]
        assert len(numbers) in ((2,) if p.difficulty <= 3 else (2, 3)), p
        assert min(numbers) >= 2, p
    assert builtin_problems(1000, seed=9, kinds=["word"]) == problems
    # Harder levels have larger numbers and more steps.
    by_level = {
        level: [int(p.answer) for p in problems if p.difficulty == level] for level in DIFFICULTIES
    }
    assert max(by_level[1]) <= 18
    assert sum(by_level[5]) / len(by_level[5]) > sum(by_level[1]) / len(by_level[1])


def test_builtin_word_answers_follow_the_story() -> None:
    problems = builtin_problems(500, seed=4, kinds=["word"])
    checked = 0
    for p in problems:
        numbers = [int(n) for n in re.findall(r"\d+", p.prompt)]
        if " and buys " in p.prompt:
            expected = numbers[0] + numbers[1]
        elif " to a friend" in p.prompt:
            expected = numbers[0] - numbers[1]
        elif p.prompt.startswith("A ") and " holds " in p.prompt:
            expected = numbers[0] * numbers[1]
        elif " equally among " in p.prompt:
            expected = numbers[0] // numbers[1]
            assert numbers[0] % numbers[1] == 0, p
        elif " then gives " in p.prompt:
            expected = numbers[0] + numbers[1] - numbers[2]
        elif " in each " in p.prompt:
            expected = numbers[0] * numbers[1] + numbers[2]
        elif " more " in p.prompt and " than " in p.prompt:
            expected = 2 * numbers[0] + numbers[1]
        else:
            continue
        checked += 1
        assert p.answer == str(expected), p
    assert checked == len(problems)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_problems": 0}, "num_problems must be an integer >= 1"),
        ({"num_problems": -5}, "num_problems must be an integer >= 1"),
        ({"kinds": ["add", "div"]}, "kinds must be a non-empty subset of ['add', 'sub', 'mul',"),
        ({"kinds": []}, "kinds must be a non-empty subset"),
        ({"difficulties": [0, 1]}, "difficulties must be a non-empty subset of [1, 2, 3, 4, 5]"),
        ({"difficulties": [6]}, "difficulties must be a non-empty subset"),
        ({"difficulties": []}, "difficulties must be a non-empty subset"),
    ],
)  # fmt: skip
def test_builtin_argument_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        builtin_problems(**kwargs)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# Splitting


def test_split_is_deterministic_disjoint_and_sized() -> None:
    problems = builtin_problems(100, seed=1)
    train, val = split_problems(problems, 0.2, seed=7)
    assert (train, val) == split_problems(problems, 0.2, seed=7)
    assert len(val) == 20 and len(train) == 80
    assert {p.id for p in train}.isdisjoint(p.id for p in val)
    assert {p.id for p in train} | {p.id for p in val} == {p.id for p in problems}
    # Both sides keep the input order.
    order = {p.id: i for i, p in enumerate(problems)}
    assert [order[p.id] for p in train] == sorted(order[p.id] for p in train)
    assert [order[p.id] for p in val] == sorted(order[p.id] for p in val)
    assert split_problems(problems, 0.2, seed=8)[1] != val


@pytest.mark.parametrize(
    ("n", "fraction", "n_val"),
    [(100, 0.0, 0), (10, 0.01, 1), (2, 0.1, 1), (1, 0.5, 0), (3, 0.9, 2), (0, 0.5, 0), (7, 0.5, 4)],
)
def test_split_sizes(n: int, fraction: float, n_val: int) -> None:
    problems = builtin_problems(n) if n else []
    train, val = split_problems(problems, fraction)
    assert len(val) == n_val
    assert len(train) == n - n_val


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction must be in \\[0, 1\\)"):
        split_problems(builtin_problems(10), fraction)


def test_eval_sets_are_the_lm_eval_tasks_items() -> None:
    """EVAL_SETS (what data.exclude keeps out) names the same items as the task YAML files."""
    import yaml

    from lrkd.data.problems import EVAL_SETS
    from lrkd.evaluation.builtin import TASKS_DIR

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for name, spec in EVAL_SETS.items():
        task = yaml.load((TASKS_DIR / f"{name}.yaml").read_text(), Loader=_Loader)
        assert task["task"] == name and task["dataset_kwargs"] == spec


def test_excluded_prompts_from_sets_and_files(tmp_path) -> None:
    from lrkd.data.problems import excluded_prompts

    prompts = excluded_prompts(["lrkd_arithmetic"])
    assert prompts == {p.prompt for p in builtin_problems(250, 1234, ["add", "sub", "mul"])}
    write_problems([Problem("a", " What is 1 + 1? ", "2")], tmp_path / "mine.jsonl")
    assert excluded_prompts([str(tmp_path / "mine.jsonl")]) == {"What is 1 + 1?"}
    with pytest.raises(FileNotFoundError, match=r"data.exclude: 'lrkd_arith'.*lrkd_arithmetic"):
        excluded_prompts(["lrkd_arith"])
