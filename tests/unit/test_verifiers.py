"""Verifiers: answer extraction and comparison, on tables of ordinary and adversarial cases."""

from __future__ import annotations

import math

import pytest

from lrkd.data.verifiers import (
    VERIFIERS,
    Boxed,
    ExactMatch,
    FinalNumber,
    RegexMatch,
    Verifier,
    extract_boxed,
    get_verifier,
    last_number,
    normalize_answer,
    parse_number,
)

# ---------------------------------------------------------------------------------------------
# normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", "42"),
        ("  42  ", "42"),
        ("$42$", "42"),
        ("$$42$$", "42"),
        (r"\(42\)", "42"),
        (r"\[42\]", "42"),
        (r"\text{Paris}", "paris"),
        (r"\mathrm{Paris}", "paris"),
        (r"$\text{Paris}$", "paris"),
        ("Paris.", "paris"),
        ("Paris...", "paris"),
        ("$5$.", "5"),
        ("New   York\n City", "new york city"),
        ('"Paris"', "paris"),
        ("'Paris'", "paris"),
        ("“Paris”", "paris"),
        ('"Paris".', "paris"),
        ("1,234", "1234"),
        ("1,234,567", "1234567"),
        ("-1,234.5", "-1234.5"),
        ("1{,}234", "1234"),
        ("1,234 apples", "1234 apples"),
        ("1,23", "1,23"),  # not a valid thousands group: left alone
        ("(1, 2)", "(1, 2)"),
        ("−3", "-3"),
        ("", ""),
        ("   ", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_normalize_answer_can_keep_case() -> None:
    assert normalize_answer(r"$\text{Paris}$.", lowercase=False) == "Paris"
    assert normalize_answer("Paris") == "paris"


# ---------------------------------------------------------------------------------------------
# extract_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"The answer is \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b}}} done", r"\sqrt{\frac{a}{b}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed{3} and finally \fbox{4}", "4"),
        (r"\boxed { 5 }", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not structure
        (r"$\boxed{-3}$", "-3"),
        (r"\boxed{}", ""),
        ("no box here", None),
        ("", None),
        (r"\boxed{5", None),  # never closed
        (r"\boxed{5} ... \boxed{6", None),  # the last box is truncated
        (r"\boxed{\frac{1}{2}", None),
        (r"\boxed 5", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_extract_boxed_long_adversarial_input_is_linear() -> None:
    text = r"\boxed{" * 20_000 + "{" * 20_000
    assert extract_boxed(text) is None
    assert extract_boxed(text + "}" * 20_001 + r" \boxed{9}") == "9"


# ---------------------------------------------------------------------------------------------
# parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        ("0", 0.0),
        ("-3", -3.0),
        ("+3", 3.0),
        ("−3", -3.0),  # unicode minus
        ("0.5", 0.5),
        (".5", 0.5),
        ("-.5", -0.5),
        ("3.", 3.0),
        ("3.0", 3.0),
        ("12.50.", 12.5),  # trailing period
        ("1,234", 1234.0),
        ("1,234,567", 1234567.0),
        ("-1,234.25", -1234.25),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("−3/4", -0.75),
        (r"\frac{3}{4}", 0.75),
        (r"\dfrac{3}{4}", 0.75),
        (r"\tfrac{1}{8}", 0.125),
        (r"-\frac{3}{4}", -0.75),
        (r"\frac{-3}{4}", -0.75),
        (r"\frac{ 1 }{ 2 }", 0.5),
        (r"\frac12", 0.5),
        ("50%", 50.0),
        (r"50\%", 50.0),
        ("12.5 %", 12.5),
        ("1e3", 1000.0),
        ("2.5E-3", 0.0025),
        ("-1.5e+2", -150.0),
        ("$42$", 42.0),
        ("$-3/4$", -0.75),
        (r"\(7\)", 7.0),
        (r"\$12.50", 12.5),
        ("  7  ", 7.0),
        ("007", 7.0),
    ],
)
def test_parse_number(text: str, expected: float) -> None:
    value = parse_number(text)
    assert value is not None
    assert value == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        ".",
        "-",
        "$$",
        "abc",
        "1,23",  # invalid thousands group
        "1,2345",
        "12,34,567",
        ",123",
        "1 234",
        "3 apples",
        "x = 3",
        "1/0",  # division by zero
        r"\frac{1}{0}",
        "0/0",
        "1/2/3",
        "3 1/2",
        "--3",
        "1.2.3",
        "inf",
        "nan",
        "1e999",  # overflows to infinity
        "0x10",
        "1_000",
        r"\frac{x}{2}",
        "2024-01-15",
        "12:30",
        "e5",
    ],
)
def test_parse_number_rejects_non_numbers(text: str) -> None:
    assert parse_number(text) is None


# ---------------------------------------------------------------------------------------------
# last_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7 - 3 = 4", "4"),
        ("The answer is -5.", "-5"),
        ("7-3", "3"),  # subtraction, not a negative number
        ("x-3", "3"),
        ("(a+b)-3", "3"),
        ("x = -3", "-3"),
        ("(-3)", "-3"),
        ("is -3", "-3"),
        ("-3", "-3"),
        ("$-3$", "-3"),
        (r"\boxed{-3}", "-3"),
        ("5−3", "3"),
        ("so it is −3", "−3"),
        ("1,234 apples", "1,234"),
        ("She has 1,234,567 coins.", "1,234,567"),
        ("1, 2, 3", "3"),
        ("1,2,3", "3"),
        ("10,20,300", "300"),  # a list, not 20,300
        ("3/4 of the cake", "3/4"),
        (r"\frac{3}{4}", r"\frac{3}{4}"),
        (r"so x = \dfrac{-1}{2}.", r"\dfrac{-1}{2}"),
        (r"= -\frac{3}{4}", r"-\frac{3}{4}"),
        (r"\frac12", r"\frac12"),
        ("It costs $12.50.", "12.50"),
        ("50%", "50%"),
        (r"about 50\% of them", r"50\%"),
        ("Step 1: 12 + 30 = 42", "42"),
        ("2.5e3", "2.5e3"),
        ("tiny: 1.5e-7 m", "1.5e-7"),
        ("The result is 3.", "3"),
        ("about .5 liters", ".5"),
        ("1,234.56 dollars", "1,234.56"),
        ("no digits at all", None),
        ("", None),
        ("- . , / %", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("The answer is -5.", -5.0),
        ("1,234 apples", 1234.0),
        ("3/4 of the cake", 0.75),
        (r"\frac{3}{4}", 0.75),
        ("It costs $12.50.", 12.5),
        ("50%", 50.0),
        ("so it is −3", -3.0),
        ("2.5e3", 2500.0),
    ],
)
def test_last_number_parses_to_its_value(text: str, value: float) -> None:
    found = last_number(text)
    assert found is not None
    assert parse_number(found) == pytest.approx(value)


@pytest.mark.parametrize(
    "text",
    ["2024-01-15", "1/2/2024", "12:30:45", "v1.2.3", "192.168.0.1", "+-+-3", "1e", "3/", "/4"],
)
def test_last_number_odd_strings_do_not_crash(text: str) -> None:
    found = last_number(text)
    assert found is None or found in text
    if found is not None:
        parse_number(found)  # must not raise either


def test_last_number_long_input() -> None:
    text = "1," * 50_000 + " and finally 7"
    assert last_number(text) == "7"
    assert last_number("9" * 100_000) == "9" * 100_000


# ---------------------------------------------------------------------------------------------
# FinalNumber


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The answer is 42.", "42", True),
        ("42", "42", True),
        ("First 10, then 20, finally 42", "42", True),
        ("I think 42. No wait, it is 41", "42", False),  # the last number wins
        ("Step 1: 12 + 30 = 42", "42", True),
        ("7 - 3 = 4", "4", True),
        ("7 - 3 = 4", "-3", False),
        ("The answer is -5.", "-5", True),
        ("The answer is -5.", "5", False),
        ("7-5", "-5", False),  # subtraction, not -5
        ("x = −5", "-5", True),  # unicode minus
        ("1,234 apples", "1234", True),
        ("1234 apples", "1,234", True),
        ("1,234", "1,234", True),
        ("1, 2, 3", "3", True),
        ("3/4 of the cake", "0.75", True),
        ("0.75 of the cake", "3/4", True),
        (r"$\frac{3}{4}$", "0.75", True),
        (r"$\frac{3}{4}$", "3/4", True),
        (r"$\dfrac{3}{4}$", r"\frac{3}{4}", True),
        ("It costs $12.50.", "12.5", True),
        ("It costs $12.50.", "12.50", True),
        ("The result is 3.", "3", True),
        ("About 50% of them", "50", True),
        ("About 50% of them", "50%", True),
        ("About 50% of them", "0.5", False),
        ("2.5e3 grams", "2500", True),
        ("x = 0.1 + 0.2 = 0.30000000000000004", "0.3", True),
        ("No idea.", "42", False),
        ("", "42", False),
        ("   \n  ", "0", False),
        ("The answer is 42", "forty-two", False),
        ("The answer is 4.2", "42", False),
        ("The answer is 420", "42", False),
        ("I divide by zero: 1/0", "1", False),
    ],
)
def test_final_number(completion: str, answer: str, expected: bool) -> None:
    assert FinalNumber()(completion, answer) is expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        (r"So \boxed{42} is it. (Checked with 3 methods.)", "42", True),
        (r"\boxed{\frac{1}{2}} and 7 more lines", "0.5", True),
        (r"\boxed{x = -3}, tested 2 times", "-3", True),  # last number within the box
        (r"\boxed{5} ... \boxed{6} because 7", "6", True),  # the last box
        (r"\boxed{1,234} of 5", "1234", True),
        (r"\boxed{-\dfrac{3}{4}}", "-0.75", True),
        (r"\boxed{x} since 3", "3", False),  # a box without a number is not a number
        (r"\boxed{Paris} (population 2,100,000)", "Paris", True),  # non-numeric reference
        (r"\boxed{London}", "Paris", False),
        (r"\boxed{}. 42", "42", False),  # an empty box is no answer
        # a truncated box is not a box: the last number counts
        (r"42 and then \boxed{7", "7", True),
        (r"42 and then \boxed{7", "42", False),
    ],
)
def test_final_number_prefers_box(completion: str, answer: str, expected: bool) -> None:
    assert FinalNumber()(completion, answer) is expected


def test_final_number_prefer_boxed_off_takes_last_number() -> None:
    completion = r"\boxed{42}, checked with 3 methods"
    assert FinalNumber(prefer_boxed=True).extract(completion) == "42"
    assert FinalNumber(prefer_boxed=False).extract(completion) == "3"
    assert FinalNumber(prefer_boxed=True)(completion, "42")
    assert not FinalNumber(prefer_boxed=False)(completion, "42")
    assert FinalNumber(prefer_boxed=False)(completion, "3")


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("The answer is 42.", "42"),
        (r"\boxed{\frac{1}{2}} then 9", r"\frac{1}{2}"),
        (r"\boxed{x = 5}", "5"),
        (r"\boxed{Paris}", "Paris"),
        ("nothing numeric", None),
        ("", None),
    ],
)
def test_final_number_extract(completion: str, expected: str | None) -> None:
    assert FinalNumber().extract(completion) == expected


@pytest.mark.parametrize(
    ("tolerance", "relative", "candidate", "answer", "expected"),
    [
        (1e-6, False, "3.1415926", "3.1415927", True),
        (1e-6, False, "3.14", "3.1415927", False),
        (0.01, False, "3.14", "3.1415927", True),
        (0.0, False, "2", "2.0", True),
        (0.0, False, "2.000001", "2", False),
        (0.5, False, "1000.4", "1000", True),
        (0.5, False, "1000.6", "1000", False),
        # relative: tolerance scales with |answer| once |answer| > 1
        (1e-3, True, "1000.9", "1000", True),
        (1e-3, True, "1001.1", "1000", False),
        (1e-3, False, "1000.9", "1000", False),
        (1e-3, True, "-1000.9", "-1000", True),
        # ...but never below the absolute tolerance for small answers
        (1e-3, True, "0.0009", "0", True),
        (1e-3, True, "0.0011", "0", False),
        (1e-3, True, "0.5009", "0.5", True),
    ],
)
def test_final_number_tolerance(
    tolerance: float, relative: bool, candidate: str, answer: str, expected: bool
) -> None:
    verifier = FinalNumber(tolerance=tolerance, relative=relative)
    assert verifier.matches(candidate, answer) is expected
    assert verifier(f"So the result is {candidate}", answer) is expected


def test_final_number_matches_non_numeric_reference_by_exact_match() -> None:
    verifier = FinalNumber()
    assert verifier.matches("Paris", "paris")
    assert verifier.matches(r"\text{Paris}", "Paris.")
    assert not verifier.matches("42", "Paris")
    assert not verifier.matches("Paris", "42")


@pytest.mark.parametrize("tolerance", [-1e-6, -1.0, math.nan])
def test_final_number_rejects_bad_tolerance(tolerance: float) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        FinalNumber(tolerance=tolerance)


# ---------------------------------------------------------------------------------------------
# ExactMatch


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Let me think.\nThe answer is Paris.", "Paris."),
        ("The answer is Paris.\nI am confident.", "Paris."),  # marker beats the last line
        ("answer: Paris\nthe answer is London", "London"),  # last occurrence
        ("Final Answer: Paris", "Paris"),
        ("THE ANSWER IS PARIS", "PARIS"),
        ("**Answer:** Paris", "Paris"),
        ("The answer is: Paris", "Paris"),
        ("Answer:\n\nParis\nbecause...", "Paris"),  # nothing after the marker on its line
        ("Answer:", None),
        ("My answers: many\nParis", "Paris"),  # "answers:" is not the marker
        ("The answer isn't obvious.\nParis", "Paris"),
        (r"The answer is Rome. \boxed{Paris}", "Paris"),  # a box beats the marker
        ("Reasoning...\n\nParis\n\n  ", "Paris"),  # last non-empty line
        ("Paris", "Paris"),
        ("", None),
        ("  \n\t\n", None),
    ],
)
def test_exact_match_extract(completion: str, expected: str | None) -> None:
    assert ExactMatch().extract(completion) == expected


def test_exact_match_custom_and_disabled_marker() -> None:
    completion = "Result: Paris\nThe answer is London\nDone"
    assert ExactMatch(marker="result").extract(completion) == "Paris"
    assert ExactMatch(marker="answer").extract(completion) == "London"
    assert ExactMatch(marker=None).extract(completion) == "Done"
    assert ExactMatch(marker="a.b").extract("axb: 1\na.b: 2\nend") == "2"  # literal, not regex


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The answer is Paris.", "Paris", True),
        ("The answer is paris", "Paris", True),
        ("The answer is $\\text{Paris}$.", "Paris", True),
        ('The answer is "Paris".', "Paris", True),
        ("The answer is Paris, France.", "Paris", False),
        ("The answer is London.", "Paris", False),
        ("I guess\nParis", "Paris", True),
        ("Paris?\nNo, London", "Paris", False),
        ("The answer is 1234.", "1,234", True),
        ("The answer is 1,234.", "1234", True),
        ("The answer is 0.50", "0.5", True),  # numeric equality
        ("The answer is -3", "−3", True),
        ("The answer is 3/4", "0.75", True),
        ("The answer is 42 apples", "42", False),
        ("The answer is 42", "43", False),
        (r"\boxed{New  York}", "new york", True),
        ("", "Paris", False),
        ("Answer:", "Paris", False),
    ],
)
def test_exact_match(completion: str, answer: str, expected: bool) -> None:
    assert ExactMatch()(completion, answer) is expected


def test_exact_match_case_sensitive() -> None:
    assert ExactMatch(case_sensitive=False)("The answer is PARIS", "Paris")
    assert not ExactMatch(case_sensitive=True)("The answer is PARIS", "Paris")
    assert ExactMatch(case_sensitive=True)("the ANSWER is Paris.", "Paris")  # marker any case
    assert ExactMatch(case_sensitive=True)("The answer is 1,234", "1234")


# ---------------------------------------------------------------------------------------------
# Boxed


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        (r"So \boxed{42}.", "42", True),
        (r"\boxed{42.0}", "42", True),
        (r"\boxed{\frac{1}{2}}", "0.5", True),
        (r"\boxed{\frac{1}{2}}", "1/2", True),
        (r"\boxed{0.333333}", "1/3", False),  # numeric match is exact...
        (r"\boxed{0.3333333333}", "1/3", True),  # ...up to 1e-9
        (r"\boxed{1,234}", "1234", True),
        (r"\boxed{-3}", "−3", True),
        (r"\boxed{1}\boxed{2}", "1", False),  # the last box counts
        (r"\boxed{1}\boxed{2}", "2", True),
        (r"\boxed{\text{Paris}}", "Paris", True),
        (r"\boxed{Paris}", "London", False),
        (r"\boxed{x^2 + 1}", "x^2 + 1", True),
        (r"\boxed{x^2+1}", "x^2 + 1", False),  # text answers must match exactly
        ("The answer is 42.", "42", False),  # no box, no answer
        ("", "42", False),
        (r"\boxed{42", "42", False),  # unclosed
        (r"\boxed{}", "42", False),
    ],
)
def test_boxed(completion: str, answer: str, expected: bool) -> None:
    assert Boxed()(completion, answer) is expected


def test_boxed_extract_without_box_is_none() -> None:
    assert Boxed().extract("the answer is 42") is None
    assert Boxed().extract(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"


# ---------------------------------------------------------------------------------------------
# RegexMatch


def test_regex_match_last_match_group_one() -> None:
    verifier = RegexMatch(r"ANSWER: (\S+)")
    completion = "ANSWER: 1\nhmm\nANSWER: 2"
    assert verifier.extract(completion) == "2"
    assert verifier(completion, "2")
    assert not verifier(completion, "1")
    assert verifier.extract("no marker") is None
    assert not verifier("no marker", "2")


def test_regex_match_group_zero_without_groups() -> None:
    verifier = RegexMatch(r"[A-Z][a-z]+")
    assert verifier.extract("going from Rome to Paris") == "Paris"
    assert verifier("going from Rome to Paris", "paris")


def test_regex_match_numbered_and_named_groups() -> None:
    completion = "pair (3, 4) then pair (5, 6)"
    assert RegexMatch(r"\((\d+), (\d+)\)", group=2).extract(completion) == "6"
    assert RegexMatch(r"\((\d+), (\d+)\)", group=0).extract(completion) == "(5, 6)"
    named = RegexMatch(r"\((?P<x>\d+), (?P<y>\d+)\)", group="x")
    assert named.extract(completion) == "5"
    assert named(completion, "5")


def test_regex_match_group_absent_from_last_match() -> None:
    verifier = RegexMatch(r"(?:answer=(\d+)|skip)")
    assert verifier.extract("answer=4 then skip") is None
    assert not verifier("answer=4 then skip", "4")


@pytest.mark.parametrize(
    ("numeric", "candidate_text", "answer", "expected"),
    [
        (True, "1,234", "1234", True),
        (True, "0.750", "3/4", True),
        (True, "-2", "−2", True),
        (True, "2.0000001", "2", True),
        (True, "2.1", "2", False),
        (True, "abc", "2", False),
        (True, "Paris", "paris", True),  # non-numeric reference: compared as text
        (False, "0.750", "3/4", False),
        (False, "1,234", "1234", True),  # normalization drops thousands separators
        (False, "Paris", "paris", True),
    ],
)
def test_regex_match_numeric(
    numeric: bool, candidate_text: str, answer: str, expected: bool
) -> None:
    verifier = RegexMatch(r"<ans>(.*?)</ans>", numeric=numeric)
    assert verifier(f"blah <ans>9</ans> <ans>{candidate_text}</ans>", answer) is expected


def test_regex_match_tolerance() -> None:
    assert RegexMatch(r"= (\S+)", numeric=True, tolerance=0.1)("x = 2.05", "2")
    assert not RegexMatch(r"= (\S+)", numeric=True, tolerance=0.01)("x = 2.05", "2")
    with pytest.raises(ValueError, match="tolerance"):
        RegexMatch(r"(\d+)", tolerance=-1)


def test_regex_match_flags() -> None:
    completion = "Answer: 1\nanswer: 2\nstop"
    assert RegexMatch(r"Answer: (\d)").extract(completion) == "1"
    assert RegexMatch(r"Answer: (\d)", flags="i").extract(completion) == "2"
    assert RegexMatch(r"^stop$").extract(completion) is None
    assert RegexMatch(r"^stop$", flags="m").extract(completion) == "stop"
    assert RegexMatch(r"2.stop").extract(completion) is None
    assert RegexMatch(r"2.stop", flags="s").extract(completion) == "2\nstop"
    assert RegexMatch(r"answer : \s (\d)  # comment", flags="x").extract(completion) == "2"
    assert RegexMatch(r"^answer: (\d)$", flags="im").extract(completion) == "2"


@pytest.mark.parametrize("pattern", ["(unclosed", "[a-", "*oops", "(?P<x>a)(?P<x>b)"])
def test_regex_match_invalid_pattern(pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid regex pattern") as info:
        RegexMatch(pattern)
    assert repr(pattern) in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "kwargs", "message"),
    [
        (r"(\d+)", {"flags": "iq"}, "flag"),
        (r"(\d+)", {"group": 2}, "no group 2"),
        (r"\d+", {"group": 3}, "no group 3"),
        (r"(\d+)", {"group": -1}, "no group -1"),
        (r"(\d+)", {"group": "name"}, "no group named 'name'"),
    ],
)
def test_regex_match_bad_arguments(pattern: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RegexMatch(pattern, **kwargs)


# ---------------------------------------------------------------------------------------------
# get_verifier, VERIFIERS, custom verifiers


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("final_number", FinalNumber),
        ("exact_match", ExactMatch),
        ("boxed", Boxed),
        ("Final-Number", FinalNumber),
        (" boxed ", Boxed),
    ],
)
def test_get_verifier_by_name(name: str, cls: type[Verifier]) -> None:
    verifier = get_verifier(name)
    assert type(verifier) is cls


def test_get_verifier_defaults() -> None:
    verifier = get_verifier("final_number")
    assert isinstance(verifier, FinalNumber)
    assert verifier.tolerance == 1e-6
    assert verifier.relative is False
    assert verifier.prefer_boxed is True


def test_get_verifier_returns_instances_unchanged() -> None:
    verifier = RegexMatch(r"(\d+)", numeric=True)
    assert get_verifier(verifier) is verifier


def test_get_verifier_regex_by_name_explains_class_path() -> None:
    with pytest.raises(ValueError, match="class_path") as info:
        get_verifier("regex")
    assert "pattern" in str(info.value)
    assert "RegexMatch" in str(info.value)


def test_get_verifier_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown verifier 'nope'") as info:
        get_verifier("nope")
    message = str(info.value)
    for name in VERIFIERS:
        assert name in message
    assert "class_path" in message
    assert "lrkd.data.verifiers.Verifier" in message


def test_get_verifier_wrong_type() -> None:
    with pytest.raises(TypeError):
        get_verifier(42)  # type: ignore[arg-type]


def test_verifiers_registry() -> None:
    assert {
        "final_number": FinalNumber,
        "exact_match": ExactMatch,
        "boxed": Boxed,
        "regex": RegexMatch,
    } == VERIFIERS
    assert all(issubclass(cls, Verifier) for cls in VERIFIERS.values())


class _LastWord(Verifier):
    """The last word of the completion, compared case-sensitively."""

    def extract(self, completion: str) -> str | None:
        words = completion.split()
        return words[-1] if words else None

    def matches(self, candidate: str, answer: str) -> bool:
        return candidate == answer


class _FirstLine(Verifier):
    """The first line, with the default (normalized) comparison."""

    def extract(self, completion: str) -> str | None:
        return completion.splitlines()[0] if completion else None


def test_custom_verifier_through_call() -> None:
    verifier = _LastWord()
    assert verifier("it is Paris", "Paris")
    assert not verifier("it is paris", "Paris")  # its own matches() is case-sensitive
    assert not verifier("", "Paris")  # extract gives None
    assert get_verifier(verifier) is verifier


def test_custom_verifier_default_matches_normalizes() -> None:
    verifier = _FirstLine()
    assert verifier("$\\text{PARIS}$.\nsomething else", "paris")
    assert verifier("1,234\n", "1234")
    assert not verifier("London\nParis", "Paris")
    assert not verifier("", "Paris")


def test_base_verifier_extract_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        Verifier()("anything", "x")


def test_non_string_answer_is_converted() -> None:
    assert FinalNumber()("so 42", 42)  # type: ignore[arg-type]
    assert ExactMatch()("The answer is 42", 42)  # type: ignore[arg-type]


def test_verifier_repr_shows_arguments() -> None:
    assert repr(FinalNumber(tolerance=0.5)) == (
        "FinalNumber(tolerance=0.5, relative=False, prefer_boxed=True)"
    )
    assert "pattern='(\\\\d+)'" in repr(RegexMatch(r"(\d+)"))


@pytest.mark.parametrize("cls", [FinalNumber, ExactMatch, Boxed, RegexMatch])
def test_docstrings_document_init_arguments(cls: type[Verifier]) -> None:
    """The class docstrings become CLI help, so each __init__ argument must be documented."""
    import inspect

    doc = cls.__doc__ or ""
    params = [
        name
        for name, param in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
    ]
    assert bool(params) is (cls is not Boxed)
    if params:
        assert "Args:" in doc
    for param in params:
        assert f"{param}:" in doc, f"{cls.__name__} does not document {param}"


def test_verifier_given_by_class_path_in_a_config() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--verifier", type=Verifier)
    config = parser.parse_string(
        "verifier:\n"
        "  class_path: lrkd.data.verifiers.RegexMatch\n"
        "  init_args: {pattern: 'x = (\\S+)', numeric: true, tolerance: 0.01}\n"
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    verifier = instantiate(config).verifier
    assert isinstance(verifier, RegexMatch)
    assert verifier.numeric is True
    assert verifier.tolerance == 0.01
    assert verifier("x = 1 then x = 2.005", "2")
    assert not verifier("x = 1 then x = 2.5", "2")
