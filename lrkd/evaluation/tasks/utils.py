# lm-eval loads this file by path for the `!function utils.<name>` entries of the YAML files
# beside it; the functions are lrkd's (lrkd.evaluation.builtin).
from lrkd.evaluation.builtin import (
    corpus_dataset,
    problems_dataset,
    process_results,
    pydoc_dataset,
)

__all__ = ["corpus_dataset", "problems_dataset", "process_results", "pydoc_dataset"]
