"""Prompt + response rows longer than ``data.seq_length``, and what the DataModules do with them.

A row (a prompt and a response, as token ids) is cut to ``seq_length`` tokens, so two things
can happen to one that is longer:

- **overlong**: the prompt alone has ``seq_length`` tokens or more, so no response token is
  left and the row has no training target (its loss is 0, silently). ``data.overlong``
  chooses: ``error`` (the default: refuse the data, saying how many rows and which
  ``seq_length`` would fit them), ``drop`` (leave those rows out, with a warning),
  ``truncate_left`` (below) or ``keep`` (keep them as cut, with no target, with a warning: what
  earlier versions did silently; the golden runs of ``tests/golden`` rely on it).
- **cut response**: the prompt fits, but the response loses its end. Long responses cut at
  ``seq_length`` are common and often intended, so this is a warning with the count.

With ``truncate_left``, every row longer than ``seq_length`` (overlong or not) loses the start
of its prompt instead of the end of its response: the row is the prompt's last tokens followed
by the whole response. A response of ``seq_length`` tokens or more keeps its first
``seq_length - 1`` tokens after the prompt's last token (one prompt token always stays: it
predicts the first response token).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

__all__ = ["OVERLONG_MODES", "fit_row", "keep_rows", "warn_long_rows"]

log = logging.getLogger("lrkd")

OVERLONG_MODES: tuple[str, ...] = ("error", "drop", "truncate_left", "keep")
"""The choices of ``data.overlong``."""


def keep_rows(
    prompt_lengths: Mapping[str, Sequence[int]],
    labels: Mapping[str, Sequence[str]],
    seq_length: int,
    mode: str,
    what: str = "records",
    total_lengths: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, list[int]]:
    """The rows to keep of each split, by the overlong rule of ``mode``.

    Args:
        prompt_lengths: each split's prompt lengths in tokens (splits checked together, so
            one error counts them all).
        labels: each split's row names for the error (``file:line``, ``problem id 'x'``).
        seq_length: the row length (``data.seq_length``).
        mode: ``error``, ``drop``, ``truncate_left`` or ``keep`` (``data.overlong``).
        what: the rows' name in messages (``records``, ``problems``).
        total_lengths: each split's prompt + response lengths, where the responses are
            known: the error then also says which ``seq_length`` keeps every response whole.

    Returns:
        Each split's indices of the rows to keep, in order (all of them unless ``drop``).

    Raises:
        ValueError: ``mode`` is ``error`` and a prompt leaves no room for a response token,
            or ``drop`` leaves out every row of a split that had rows.
    """
    over = {
        split: [i for i, n in enumerate(lengths) if n >= seq_length]
        for split, lengths in prompt_lengths.items()
    }
    count = sum(len(rows) for rows in over.values())
    everything = {split: list(range(len(lengths))) for split, lengths in prompt_lengths.items()}
    if count == 0 or mode == "truncate_left":
        return everything
    total = sum(len(lengths) for lengths in prompt_lengths.values())
    longest = max(prompt_lengths[split][i] for split, rows in over.items() for i in rows)
    first = next(labels[split][rows[0]] for split, rows in over.items() if rows)
    splits = ", ".join(f"{len(rows)} {split}" for split, rows in over.items() if rows)
    which = f"{count} of {total} {what}" + (f" ({splits})" if len(prompt_lengths) > 1 else "")
    which_long = (f"{which} have a prompt of {seq_length} tokens or more (longest {longest}; "
                  f"e.g. {first})")  # fmt: skip
    if mode == "keep":
        log.warning("lrkd: data.overlong=keep, data.seq_length=%d: %s; none of their response "
                    "tokens is trained on", seq_length, which_long)  # fmt: skip
        return everything
    if mode == "error":
        whole = ""
        if total_lengths is not None:
            fit_all = max(n for lengths in total_lengths.values() for n in lengths)
            whole = f" ({fit_all} keeps every response whole)"
        example = first.rsplit("/", 1)[-1]  # a file's name and line, not its whole path
        raise ValueError(
            f"data.seq_length={seq_length}: {which} have a prompt of {seq_length}+ tokens "
            f"(longest {longest}, e.g. {example}), so no response token is trained; set "
            f"data.seq_length >= {longest + 1}{whole}, or data.overlong: drop or truncate_left"
        )
    kept = {split: sorted(set(rows) - set(over[split])) for split, rows in everything.items()}
    for split, rows in kept.items():
        if everything[split] and not rows:
            where = f" in {split}" if len(prompt_lengths) > 1 else ""
            raise ValueError(
                f"data.overlong=drop leaves no {what}{where}: every prompt has data.seq_length="
                f"{seq_length} tokens or more (longest {longest}); raise data.seq_length"
            )
    log.warning("lrkd: data.overlong=drop, data.seq_length=%d: %s; leaving them out",
                seq_length, which_long)  # fmt: skip
    return kept


def warn_long_rows(
    lengths: Sequence[tuple[int, int]], seq_length: int, mode: str, what: str = "records"
) -> None:
    """Warn, with counts, about the rows longer than ``seq_length``: a response cut at its end,
    or (``truncate_left``) a prompt cut at its start.

    Args:
        lengths: (prompt, response) length of every row, in tokens.
        seq_length: the row length (``data.seq_length``).
        mode: ``data.overlong``.
        what: the rows' name in messages.
    """
    long = [(p, r) for p, r in lengths if p + r > seq_length]
    if not long:
        return
    longest = max(p + r for p, r in long)
    which = f"{len(long)} of {len(lengths)} {what} are longer than data.seq_length={seq_length}"
    if mode != "truncate_left":
        log.warning(
            "lrkd: %s (longest %d tokens) and lose the end of their response; set "
            "data.seq_length to %d to keep them whole", which, longest, longest,
        )  # fmt: skip
        return
    message = f"lrkd: data.overlong=truncate_left: {which} (longest {longest} tokens) and lose "
    message += "the start of their prompt"
    if overlong := sum(p >= seq_length for p, _ in long):
        message += f" ({overlong} with no response token left otherwise)"
    if too_long := sum(r >= seq_length for _, r in long):
        message += f"; {too_long} with a response of seq_length tokens or more also lose its end"
    log.warning(message)


def fit_row(
    prompt: Sequence[int], response: Sequence[int], seq_length: int, mode: str
) -> tuple[list[int], list[int]]:
    """The prompt and response of a row as it goes into an example of ``seq_length`` tokens.

    Unchanged (the example is cut at its end) unless ``mode`` is ``truncate_left`` and the row
    is longer: then the response is kept whole (its first ``seq_length - 1`` tokens at most)
    after the prompt's last tokens.
    """
    if mode != "truncate_left" or len(prompt) + len(response) <= seq_length:
        return list(prompt), list(response)
    n_response = min(len(response), seq_length - 1)
    n_prompt = seq_length - n_response
    return list(prompt[len(prompt) - n_prompt :]), list(response[:n_response])
