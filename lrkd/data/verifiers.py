"""Verifiers: decide whether a model's free-text completion answers a problem.

A verifier is given a completion (free text written by a model, possibly long, possibly
adversarial) and the problem's reference answer as a string (``"42"``, ``"-3"``, ``"3/4"``,
``"1,234"``, ``"0.5"``, ``"Paris"``) and returns ``True`` when the completion's final answer is
the reference answer. Verifiers estimate a student's pass rate on each problem (PACED
distillation) and the validation pass@1.

Every verifier works in two steps: :meth:`Verifier.extract` picks the candidate final answer
out of the completion (``None`` when there is none), and :meth:`Verifier.matches` compares the
candidate with the reference. Calling the verifier runs both. The built-in verifiers are:

- :class:`FinalNumber` (``final_number``): the last ``\\boxed{}`` answer, else the last number
  in the completion, compared numerically within a tolerance.
- :class:`ExactMatch` (``exact_match``): the boxed answer, else the text after the last
  "answer is"/"answer:", else the last line, compared as normalized strings.
- :class:`Boxed` (``boxed``): only the last ``\\boxed{}`` answer counts.
- :class:`RegexMatch` (``regex``): a group of the last match of a regular expression.

A custom verifier subclasses :class:`Verifier`, implements ``extract`` (and, if the default
normalized exact match does not fit, ``matches``), documents its ``__init__`` arguments, and is
given in a YAML config by class path::

    data:
      init_args:
        verifier:
          class_path: my_pkg.MyVerifier
          init_args: {...}

The built-in ones can also be given by short name (``verifier: final_number``); see
:func:`get_verifier`.
"""

from __future__ import annotations

import math
import re

__all__ = [
    "VERIFIERS",
    "Boxed",
    "ExactMatch",
    "FinalNumber",
    "RegexMatch",
    "Verifier",
    "extract_boxed",
    "get_verifier",
    "last_number",
    "normalize_answer",
    "parse_number",
]

_MINUS_SIGNS = "\u2212"  # unicode minus, read as "-"

# A number without sign: digits with valid thousands groups or plain digits, optional decimals,
# or ".5"; then an optional exponent. "(?<!\d,)" stops "20,300" in "10,20,300" from being read as
# one number with a thousands separator.
_UNSIGNED = r"(?:(?:(?<!\d,)\d{1,3}(?:,\d{3})+(?!,?\d)|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
# A minus directly before a number is its sign unless it follows a letter, digit or closing
# bracket: "x = -3" and "(-3)" give -3, but "7-3" is a subtraction and gives 3.
_SIGN = r"(?:(?<![\w)\]}])[-+\u2212])?"
_SIGNED = rf"[-+\u2212]?{_UNSIGNED}"
_LATEX_FRAC = rf"\\[dt]?frac(?:\s*\{{\s*{_SIGNED}\s*\}}\s*\{{\s*{_SIGNED}\s*\}}|\s*\d\s*\d)"
_NUMBER_IN_TEXT = re.compile(
    rf"{_SIGN}(?:{_LATEX_FRAC}|(?<!\d){_UNSIGNED}(?:/\d+(?:\.\d+)?)?(?:\s*\\?%)?)"
)

_PLAIN_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRACTION = re.compile(r"([-+]?)\\[dt]?frac\s*(?:\{([^{}]*)\}\s*\{([^{}]*)\}|(\d)\s*(\d))")
_SLASH_FRACTION = re.compile(r"([^/]+)/([^/]+)")
_PERCENT = re.compile(r"\s*\\?%$")

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_WRAPPER = re.compile(r"\\(?:text|mathrm|textbf|mathbf|textrm)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?!,?\d)")
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _last_match(regex: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last of the non-overlapping matches of ``regex`` in ``text``."""
    last = None
    for match in regex.finditer(text):
        last = match
    return last


def _strip_math_delimiters(text: str) -> str:
    """Remove math delimiters that wrap the whole of ``text`` (repeatedly), then whitespace."""
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for left, right in _MATH_DELIMITERS:
            if (
                len(text) >= len(left) + len(right)
                and text.startswith(left)
                and text.endswith(right)
            ):
                text = text[len(left) : len(text) - len(right)].strip()
                changed = True
                break
    return text


def normalize_answer(text: str, *, lowercase: bool = True) -> str:
    """Normalize an answer string so that trivially different spellings compare equal.

    Strips whitespace, surrounding ``$...$``, ``$$...$$``, ``\\(...\\)`` and ``\\[...\\]``;
    unwraps ``\\text{...}``, ``\\mathrm{...}`` (and ``\\textbf``, ``\\mathbf``, ``\\textrm``);
    removes trailing periods; lowercases; collapses whitespace to single spaces; strips
    surrounding quotes; removes thousands separators from numbers (``"1,234"`` -> ``"1234"``,
    also LaTeX ``1{,}234``); and reads a unicode minus as ``-``.

    Args:
        text: The answer to normalize.
        lowercase: Lowercase the result (turn off for case-sensitive comparison).

    Returns:
        The normalized answer.
    """
    text = text.replace("{,}", ",")
    for minus in _MINUS_SIGNS:
        text = text.replace(minus, "-")
    previous = None
    while text != previous:
        previous = text
        text = _strip_math_delimiters(text)
        text = _TEXT_WRAPPER.sub(r"\1", text)
        text = " ".join(text.split())
        text = text.rstrip(".").rstrip()
        if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
            text = text[1:-1].strip()
    text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    return text.lower() if lowercase else text


def extract_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Nested braces are balanced, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; escaped
    braces ``\\{`` and ``\\}`` do not count.

    Args:
        text: Free text, usually a model completion.

    Returns:
        The stripped content of the last box, or ``None`` when there is no box or the last one
        is never closed (e.g. a truncated completion).
    """
    starts = list(_BOX_START.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth = 1
    i = begin
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None


def _parse_plain(text: str) -> float | None:
    """Parse a signed integer, decimal or scientific number (with valid thousands groups)."""
    text = text.strip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def _divide(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def parse_number(text: str) -> float | None:
    """Parse the whole of ``text`` as one number.

    Accepts integers and decimals (``".5"``, ``"3."``), a leading ``+``/``-`` or unicode minus,
    thousands separators in valid groups of three (``"1,234,567"``; ``"1,23"`` is not a
    number), scientific notation (``"1e3"``), fractions (``"3/4"``, ``"-3/4"``), LaTeX
    ``\\frac{3}{4}``, ``\\dfrac``, ``\\tfrac`` (and ``\\frac34``), a trailing percent sign
    (``"50%"`` and ``"50\\%"`` are 50), surrounding ``$`` (or a leading ``\\$``) and trailing
    periods.

    Args:
        text: The string to parse.

    Returns:
        The value, or ``None`` when ``text`` is not exactly one number, a fraction divides by
        zero, or the value is not finite.
    """
    text = text.strip()
    for minus in _MINUS_SIGNS:
        text = text.replace(minus, "-")
    text = _strip_math_delimiters(text)
    if text.startswith("\\$"):
        text = text[2:]
    text = text.strip("$").strip().rstrip(".").rstrip()
    text = _PERCENT.sub("", text)
    if not text:
        return None
    value: float | None
    if frac := _FRACTION.fullmatch(text):
        sign, num, den, num_digit, den_digit = frac.groups()
        if num is None:
            num, den = num_digit, den_digit
        value = _divide(_parse_plain(num), _parse_plain(den))
        if value is not None and sign == "-":
            value = -value
    elif slash := _SLASH_FRACTION.fullmatch(text):
        value = _divide(_parse_plain(slash.group(1)), _parse_plain(slash.group(2)))
    else:
        value = _parse_plain(text)
    if value is None or not math.isfinite(value):
        return None
    return value


def last_number(text: str) -> str | None:
    """Return the last number written in free text, as the substring that spells it.

    Numbers include signed integers and decimals, thousands-separated numbers in valid groups,
    scientific notation, fractions ``3/4`` and LaTeX ``\\frac{3}{4}``, and percentages
    (``"50%"``). A minus directly before a number is its sign only when it does not follow a
    letter, digit or closing bracket, so ``"7-3"`` ends in ``"3"`` while ``"x = -3"``,
    ``"(-3)"`` and ``"is -3"`` end in ``"-3"``. A trailing period is not part of the number.
    :func:`parse_number` on the result gives its value.

    Args:
        text: Free text, usually a model completion.

    Returns:
        The last number's substring, or ``None`` when the text has no number.
    """
    found = _last_match(_NUMBER_IN_TEXT, text)
    return found.group(0).strip() if found else None


def _close(x: float, y: float, tolerance: float, relative: bool = False) -> bool:
    """Whether ``x`` is within ``tolerance`` of the reference ``y`` (absolute or relative)."""
    scale = max(1.0, abs(y)) if relative else 1.0
    return abs(x - y) <= tolerance * scale


def _numbers_equal(x: float, y: float) -> bool:
    """Exact numeric equality up to floating-point noise."""
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def _check_tolerance(tolerance: float) -> float:
    if not tolerance >= 0:  # also rejects NaN
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    return float(tolerance)


class Verifier:
    """Decides whether a completion answers a problem; the base of all verifiers.

    Subclass it and implement :meth:`extract` (and optionally :meth:`matches`, which by default
    is a normalized exact match). Custom verifiers are given in configs by ``class_path`` (see
    the module documentation). Calling a verifier extracts the candidate answer and compares it
    with the reference; a completion with no candidate (or an empty one) never passes.
    """

    def extract(self, completion: str) -> str | None:
        """Return the candidate final answer in ``completion``.

        Args:
            completion: The model's free-text completion.

        Returns:
            The candidate answer, or ``None`` when the completion gives none.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement extract()")

    def matches(self, candidate: str, answer: str) -> bool:
        """Whether the extracted ``candidate`` is the reference ``answer``.

        Args:
            candidate: The answer extracted from the completion.
            answer: The reference answer.

        Returns:
            ``True`` when both are equal after :func:`normalize_answer`.
        """
        return normalize_answer(candidate) == normalize_answer(answer)

    def __call__(self, completion: str, answer: str) -> bool:
        """Extract the candidate answer from ``completion`` and compare it with ``answer``.

        Args:
            completion: The model's free-text completion.
            answer: The reference answer (non-string values, e.g. an int read from JSON, are
                converted with ``str``).

        Returns:
            ``True`` when the completion's answer matches; ``False`` when it has none.
        """
        candidate = self.extract(completion)
        if candidate is None or not candidate.strip():
            return False
        return self.matches(candidate, answer if isinstance(answer, str) else str(answer))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class FinalNumber(Verifier):
    """The completion's final number (its last ``\\boxed{}`` answer first), compared numerically.

    The candidate is the content of the last ``\\boxed{}`` when ``prefer_boxed`` and there is
    one (the whole content if it is a number, else the last number in it, else the content as
    it is); otherwise the last number in the completion. It matches when both it and the
    reference parse as numbers (see :func:`parse_number`) within ``tolerance``. A reference
    that is not a number is compared by normalized exact match instead.

    Args:
        tolerance: Largest accepted difference from the reference (must be >= 0).
        relative: Scale the tolerance by ``max(1, |reference|)``.
        prefer_boxed: Take the answer from the last ``\\boxed{}`` when the completion has one,
            even when numbers follow it.
    """

    def __init__(
        self, tolerance: float = 1e-6, relative: bool = False, prefer_boxed: bool = True
    ) -> None:
        self.tolerance = _check_tolerance(tolerance)
        self.relative = relative
        self.prefer_boxed = prefer_boxed

    def extract(self, completion: str) -> str | None:
        """Return the boxed answer (when preferred and present), else the last number.

        Args:
            completion: The model's free-text completion.

        Returns:
            The candidate answer, or ``None`` when the completion has no box and no number.
        """
        if self.prefer_boxed and (boxed := extract_boxed(completion)) is not None:
            if parse_number(boxed) is not None:
                return boxed
            return last_number(boxed) or boxed
        return last_number(completion)

    def matches(self, candidate: str, answer: str) -> bool:
        """Whether ``candidate`` is the number ``answer`` within the tolerance.

        Args:
            candidate: The answer extracted from the completion.
            answer: The reference answer.

        Returns:
            ``True`` when both are numbers within the tolerance, or, when ``answer`` is not a
            number, when they are equal after :func:`normalize_answer`.
        """
        expected = parse_number(answer)
        if expected is None:
            return super().matches(candidate, answer)
        value = parse_number(candidate)
        return value is not None and _close(value, expected, self.tolerance, self.relative)


class ExactMatch(Verifier):
    """The completion's stated answer, compared with the reference as a normalized string.

    The candidate is the content of the last ``\\boxed{}`` if there is one; else, when
    ``marker`` is set and the completion contains "<marker> is" or "<marker>:" (any case), the
    rest of the line after the last occurrence (or the next non-empty line when that rest is
    empty); else the last non-empty line. Candidate and reference match when they are equal
    after :func:`normalize_answer`, or when both are numbers of equal value.

    Args:
        case_sensitive: Compare letter case too.
        marker: The word that introduces the answer ("answer" finds "The answer is 42" and
            "Answer: 42"); ``None`` to use only boxes and the last line.
    """

    def __init__(self, case_sensitive: bool = False, marker: str | None = "answer") -> None:
        self.case_sensitive = case_sensitive
        self.marker = marker
        self._marker_re: re.Pattern[str] | None = None
        if marker:
            self._marker_re = re.compile(
                rf"(?<!\w){re.escape(marker)}(?:\s+is(?![\w'’])\s*:?|\s*:)", re.IGNORECASE
            )

    def extract(self, completion: str) -> str | None:
        """Return the boxed answer, else the marked answer, else the last non-empty line.

        Args:
            completion: The model's free-text completion.

        Returns:
            The candidate answer, or ``None`` when the completion is blank.
        """
        if (boxed := extract_boxed(completion)) is not None:
            return boxed
        found = _last_match(self._marker_re, completion) if self._marker_re else None
        if found is not None:
            line, _, after = completion[found.end() :].partition("\n")
            # Markdown bold around the answer ("**Answer:** 42") is not part of it.
            candidate = line.strip().strip("*").strip()
            return candidate or _first_line(after)
        lines = [line.strip() for line in completion.splitlines() if line.strip()]
        return lines[-1] if lines else None

    def matches(self, candidate: str, answer: str) -> bool:
        """Whether ``candidate`` equals ``answer`` as normalized strings or as numbers.

        Args:
            candidate: The answer extracted from the completion.
            answer: The reference answer.

        Returns:
            ``True`` when equal after :func:`normalize_answer` (respecting ``case_sensitive``)
            or when both parse as numbers of equal value.
        """
        lowercase = not self.case_sensitive
        if normalize_answer(candidate, lowercase=lowercase) == normalize_answer(
            answer, lowercase=lowercase
        ):
            return True
        value, expected = parse_number(candidate), parse_number(answer)
        return value is not None and expected is not None and _numbers_equal(value, expected)


def _first_line(text: str) -> str | None:
    """The first non-empty line of ``text``, stripped (of markdown bold too)."""
    for line in text.splitlines():
        if line := line.strip().strip("*").strip():
            return line
    return None


class Boxed(Verifier):
    """Only the completion's last ``\\boxed{}`` answer counts; no box means no answer.

    Candidate and reference match when both parse as numbers of equal value (up to
    floating-point noise), otherwise when they are equal after :func:`normalize_answer`.
    """

    def extract(self, completion: str) -> str | None:
        """Return the content of the last ``\\boxed{}`` (see :func:`extract_boxed`).

        Args:
            completion: The model's free-text completion.

        Returns:
            The boxed answer, or ``None`` when there is no (closed) box.
        """
        return extract_boxed(completion)

    def matches(self, candidate: str, answer: str) -> bool:
        """Whether ``candidate`` equals ``answer`` as numbers, or else as normalized strings.

        Args:
            candidate: The answer extracted from the completion.
            answer: The reference answer.

        Returns:
            ``True`` on a match.
        """
        value, expected = parse_number(candidate), parse_number(answer)
        if value is not None and expected is not None:
            return _numbers_equal(value, expected)
        return super().matches(candidate, answer)


_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


class RegexMatch(Verifier):
    """A group of the last match of a regular expression, compared as text or as a number.

    Args:
        pattern: Python regular expression searched in the completion; its last match counts.
        group: Number or name of the group holding the answer; with a pattern that has no
            groups the whole match (group 0) is used.
        numeric: Compare as numbers (see :func:`parse_number`) within ``tolerance``; a
            reference that is not a number is then compared as text. Otherwise compare by
            normalized exact match.
        tolerance: Largest accepted absolute difference when ``numeric`` (must be >= 0).
        flags: Regular expression flags as letters: ``i`` ignore case, ``m`` multiline,
            ``s`` dot matches newline, ``x`` verbose.
    """

    def __init__(
        self,
        pattern: str,
        group: int | str = 1,
        numeric: bool = False,
        tolerance: float = 1e-6,
        flags: str = "",
    ) -> None:
        unknown = sorted(set(flags) - set(_REGEX_FLAGS))
        if unknown:
            raise ValueError(
                f"unknown regex flag(s) {''.join(unknown)!r} in flags={flags!r}; use letters "
                f"from 'imsx'"
            )
        compiled_flags = 0
        for letter in flags:
            compiled_flags |= _REGEX_FLAGS[letter]
        try:
            self._regex = re.compile(pattern, compiled_flags)
        except re.error as err:
            raise ValueError(f"invalid regex pattern {pattern!r}: {err}") from err
        groups = self._regex.groups
        if isinstance(group, str):
            if group not in self._regex.groupindex:
                raise ValueError(f"regex pattern {pattern!r} has no group named {group!r}")
            self._group: int | str = group
        elif groups == 0 and group in (0, 1):
            self._group = 0
        elif not 0 <= group <= groups:
            raise ValueError(f"regex pattern {pattern!r} has no group {group} ({groups} groups)")
        else:
            self._group = group
        self.pattern = pattern
        self.group = group
        self.numeric = numeric
        self.tolerance = _check_tolerance(tolerance)
        self.flags = flags

    def extract(self, completion: str) -> str | None:
        """Return the chosen group of the last match of the pattern.

        Args:
            completion: The model's free-text completion.

        Returns:
            The group's text, or ``None`` when nothing matches or the group took no part in
            the last match.
        """
        found = _last_match(self._regex, completion)
        return None if found is None else found.group(self._group)

    def matches(self, candidate: str, answer: str) -> bool:
        """Whether ``candidate`` is ``answer`` (as a number within tolerance when ``numeric``).

        Args:
            candidate: The answer extracted from the completion.
            answer: The reference answer.

        Returns:
            ``True`` on a match.
        """
        if self.numeric and (expected := parse_number(answer)) is not None:
            value = parse_number(candidate)
            return value is not None and _close(value, expected, self.tolerance)
        return super().matches(candidate, answer)


VERIFIERS: dict[str, type[Verifier]] = {
    "final_number": FinalNumber,
    "exact_match": ExactMatch,
    "boxed": Boxed,
    "regex": RegexMatch,
}


def get_verifier(spec: str | Verifier, field: str = "verifier") -> Verifier:
    """Return a verifier instance, built by short name with default arguments if needed.

    Args:
        spec: A :class:`Verifier` instance (returned unchanged) or the short name of a
            built-in one: ``final_number``, ``exact_match`` or ``boxed``. ``regex`` needs a
            pattern, so give it by ``class_path: lrkd.data.verifiers.RegexMatch`` with
            ``init_args.pattern``.
        field: the config name of the setting, which starts each error message (e.g.
            ``data.verifier``).

    Returns:
        The verifier.

    Raises:
        ValueError: ``regex`` given by name, or an unknown name.
        TypeError: ``spec`` is neither a name nor a verifier.
    """
    if isinstance(spec, Verifier):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"{field} must be a name or a Verifier instance, got {type(spec)!r}")
    name = spec.strip().lower().replace("-", "_")
    if name == "regex":
        raise ValueError(
            f"{field}: the 'regex' verifier needs a pattern: give it by class_path "
            "lrkd.data.verifiers.RegexMatch with init_args.pattern (and optionally group, "
            "numeric, tolerance, flags)"
        )
    if name not in VERIFIERS:
        known = ", ".join(sorted(VERIFIERS))
        raise ValueError(
            f"{field}: unknown verifier {spec!r}; known names: {known}. A custom verifier is "
            "given by class_path (a subclass of lrkd.data.verifiers.Verifier) with its init_args"
        )
    return VERIFIERS[name]()
