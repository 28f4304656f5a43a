"""lrkd's built-in lm-evaluation-harness tasks: data generated on the spot, so an offline machine
has meaningful tasks.

The task YAML files live in ``tasks/`` beside this module (:data:`TASKS_DIR`); ``lrkd eval`` and
:class:`~lrkd.callbacks.lm_eval.LMEvalCallback` add that folder to lm-eval's task search path,
and lm-eval's own command finds them with ``--include_path`` set to that folder (``python -c
"import lrkd.evaluation.builtin as b; print(b.TASKS_DIR)"`` prints it).

=================== ================ ======================================================
task                output type      items and metric
=================== ================ ======================================================
``lrkd_arithmetic`` generate_until   250 built-in ``+ - *`` problems (difficulty 1-5, seed
                                     1234); ``acc``: the final number of the answer, cut at
                                     the first blank line, equals the reference
                                     (:class:`~lrkd.data.verifiers.FinalNumber`, the
                                     verifier of pass-rate pacing)
``lrkd_word``       generate_until   250 built-in word problems, scored the same way
``lrkd_corpus``     loglikelihood_   200 held-out documents of the built-in corpus (seed
                    rolling          1234; the quickstart trains on seed 0);
                                     ``word_perplexity``, ``byte_perplexity``,
                                     ``bits_per_byte``
``lrkd_pydoc``      loglikelihood_   the first 1500 characters of each of the 79 topics of
                    rolling          the Python language reference that CPython ships
                                     (``pydoc_data.topics``): real English prose and code,
                                     unlike anything in the built-in corpus; the same
                                     metrics
=================== ================ ======================================================

Generation: greedy, at most 64 new tokens, stopped at ``"\\n\\n"`` or ``"Question:"`` (and at
the tokenizer's end-of-sequence token), the prompt given as a user turn of the chat template
when the model has one (``apply_chat_template``). These are the settings of lrkd's own pass@1
with ``rollouts.max_new_tokens: 64`` and ``rollouts.stop: ["\\n\\n", "Question:"]``, so the
two agree item by item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lrkd.data.corpus import builtin_corpus
from lrkd.data.problems import KINDS, builtin_problems
from lrkd.data.verifiers import FinalNumber

__all__ = [
    "BUILTIN_TASKS",
    "MAX_GEN_TOKS",
    "STOP",
    "TASKS_DIR",
    "corpus_dataset",
    "problems_dataset",
    "process_results",
    "pydoc_dataset",
]

#: The folder of the built-in task YAML files.
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

#: The built-in task names.
BUILTIN_TASKS = ("lrkd_arithmetic", "lrkd_word", "lrkd_corpus", "lrkd_pydoc")

#: The generation settings of the problem tasks (their YAML files say the same).
STOP = ("\n\n", "Question:")
MAX_GEN_TOKS = 64

_VERIFIER = FinalNumber()


def problems_dataset(
    kinds: list[str] = list(KINDS),  # noqa: B006 - read only
    num_problems: int = 250,
    seed: int = 1234,
    **_: Any,
) -> Any:
    """The built-in problems as a ``datasets.DatasetDict`` with one ``test`` split (columns
    ``id``, ``prompt``, ``answer``, ``kind``, ``difficulty``); lm-eval's ``custom_dataset``.

    Args:
        kinds: kinds of problem (:data:`lrkd.data.problems.KINDS`), all 5 difficulties each.
        num_problems: how many problems.
        seed: the generator's seed.
        **_: lm-eval passes the task's metadata too; it is not used.
    """
    import datasets

    problems = builtin_problems(num_problems, seed=seed, kinds=kinds)
    rows = {
        "id": [p.id for p in problems],
        "prompt": [p.prompt for p in problems],
        "answer": [p.answer for p in problems],
        "kind": [p.kind for p in problems],
        "difficulty": [p.difficulty for p in problems],
    }
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})


def corpus_dataset(num_documents: int = 200, seed: int = 1234, **_: Any) -> Any:
    """Documents of the built-in corpus as a ``datasets.DatasetDict`` with one ``test`` split
    (column ``text``); lm-eval's ``custom_dataset``.

    Args:
        num_documents: how many documents.
        seed: the corpus generator's seed (the quickstart trains on seed 0).
        **_: lm-eval passes the task's metadata too; it is not used.
    """
    import datasets

    texts = builtin_corpus(num_documents, seed=seed)
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})


def pydoc_dataset(max_chars: int = 1500, **_: Any) -> Any:
    """The topics of the Python language reference that ship with CPython
    (``pydoc_data.topics``, what ``help("assert")`` shows), each cut to its first ``max_chars``
    characters at a line end, as a ``datasets.DatasetDict`` with one ``test`` split (columns
    ``topic``, ``text``); lm-eval's ``custom_dataset``.

    Real English prose with some code, for a held-out loss on text that lrkd's generated corpus
    does not resemble. The text is that of the running CPython's version (3.11's: 79 topics).

    Args:
        max_chars: characters kept of each topic.
        **_: lm-eval passes the task's metadata too; it is not used.
    """
    from pydoc_data.topics import topics

    import datasets

    names = sorted(topics)
    texts = []
    for name in names:
        text = topics[name].strip()
        if len(text) > max_chars:
            cut = text.rfind("\n", 0, max_chars)
            text = text[: cut if cut > 0 else max_chars].rstrip()
        texts.append(text)
    rows = {"topic": names, "text": texts}
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``acc``: 1.0 when the final number of the (stop-cut) completion equals the answer."""
    return {"acc": float(_VERIFIER(results[0], doc["answer"]))}
