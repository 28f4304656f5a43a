"""Evaluation with lm-evaluation-harness: ``lrkd eval`` (:mod:`lrkd.evaluation.command`), the
:class:`~lrkd.callbacks.lm_eval.LMEvalCallback`, and lrkd's built-in tasks
(:mod:`lrkd.evaluation.builtin`), which need no download."""
