"""Stop sequences: where a completion ends besides the end-of-sequence token.

A model that has answered often keeps writing (a new question, another "Answer:"), and a
final-number verifier would then read a number of the new text. A stop sequence ends the
completion where it first appears, as lm-evaluation-harness's ``until`` does: a stop
**string** is found in the decoded completion (so it may span several tokens), a stop **token
id** ends the completion like EOS. The completion's text is cut before the stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["StopSequences"]


@dataclass(frozen=True)
class StopSequences:
    """Stop strings and stop token ids.

    Attributes:
        strings: end a completion at the first occurrence of any of them in its decoded text.
        token_ids: end a completion at any of these tokens (like EOS).
    """

    strings: tuple[str, ...] = ()
    token_ids: frozenset[int] = frozenset()

    @classmethod
    def of(cls, stop: Sequence[str | int] | str | None) -> StopSequences:
        """Stop strings and token ids from a mixed list (``None`` or empty: none).

        Raises:
            ValueError: an empty string, a negative id or another type (names the item).
        """
        if stop is None:
            return cls()
        if isinstance(stop, str):
            stop = [stop]
        strings: list[str] = []
        ids: set[int] = set()
        for item in stop:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise ValueError(f"stop: {item!r} is neither a string nor a token id")
            if isinstance(item, str):
                if not item:
                    raise ValueError("stop: an empty stop string would end every completion")
                strings.append(item)
            elif item < 0:
                raise ValueError(f"stop: token id {item} is negative")
            else:
                ids.add(item)
        return cls(tuple(dict.fromkeys(strings)), frozenset(ids))

    def __bool__(self) -> bool:
        return bool(self.strings or self.token_ids)

    def find(self, text: str) -> int | None:
        """The index where the first stop string starts in ``text``, or ``None``."""
        found = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(found) if found else None

    def cut_text(self, text: str) -> str:
        """``text`` up to (without) its first stop string."""
        index = self.find(text)
        return text if index is None else text[:index]

    def text(self, ids: Sequence[int], tokenizer: Any) -> str:
        """The decoded completion without special tokens, a final stop token id, or anything
        from its first stop string on."""
        if ids and ids[-1] in self.token_ids:
            ids = ids[:-1]
        return self.cut_text(tokenizer.decode(list(ids), skip_special_tokens=True))
