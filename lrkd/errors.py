"""One short line for a bad setting: lrkd's own message, not the parser's wrapping of it.

jsonargparse reports a bad value as ``Parser key "x": ...`` followed by every alternative it
tried, and wraps an error raised while instantiating a class given by ``class_path`` in the
same way, ending with a dump of the whole parsed section. These helpers find the line that
names the field and says the fix, so ``lrkd`` can print it last.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

__all__ = ["MAX_LINE", "MissingDependency", "setting_error", "short_message"]

#: The longest error line ``lrkd`` prints; longer messages are cut with an ellipsis.
MAX_LINE = 300

_PACKAGE = Path(__file__).resolve().parent
_KEY = re.compile(r'^Parser key "([^"]+)":?\s*(.*)$')
_NOISE = ("Given value", "Subtypes:", "Errors:", "Does not validate against any of the Union")


def short_message(message: str) -> str:
    """One line for a parser error ``message``: the key it names and its most specific reason.

    Example: ``'Parser key "model.loss.kd_weight":\\n  Expected a <class 'float'>. Got value:
    abc'`` becomes ``"model.loss.kd_weight: Expected a <class 'float'>. Got value: abc"``.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return message
    keys = [m.group(1) for m in map(_KEY.match, lines) if m]
    reasons = [
        line.removeprefix("- ").strip()
        for line in lines
        if not _KEY.match(line)
        and not line.startswith(_NOISE)
        and "Expected a <class 'NoneType'>" not in line
    ]
    first = _KEY.match(lines[0])
    inline = first.group(2) if first else ""
    reason = reasons[-1] if reasons else inline or lines[-1]
    reason = re.sub(r"^Problem with given class_path '[^']*':\s*", "", reason)
    text = f"{keys[0]}: {reason}" if keys and keys[0] not in reason else reason
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


def setting_error(error: BaseException) -> BaseException | None:
    """The outermost error that lrkd's own code raised about a setting in ``error``'s chain (an
    exception the parser wrapped; lrkd's outer message names the field more fully than an
    inner one it wraps), or ``None`` when no lrkd code raised one."""
    found = None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        kind = isinstance(current, ValueError | TypeError | OSError | RuntimeError)
        ours = frames and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)
        if kind and ours and found is None:
            found = current
        current = current.__cause__ or current.__context__
    return found


class MissingDependency(RuntimeError):
    """An optional dependency that a setting needs is not installed; the message gives the pip
    command that installs it."""

    #: The last one raised in this process. jsonargparse 4.39 (the oldest supported) keeps only
    #: the text of an error raised while it tries a union's types (``trainer.callbacks``), not
    #: the error itself as 4.53 does.
    last: MissingDependency | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        MissingDependency.last = self


def wrapped_missing_dependency(error: BaseException) -> MissingDependency | None:
    """The :class:`MissingDependency` whose text ``error``'s message carries, if any."""
    last = MissingDependency.last
    return last if last is not None and str(last) in str(error) else None
