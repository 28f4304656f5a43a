"""The config-file entry point of a Low-Rank Clone: a :class:`StudentBuilder` of the teacher."""

from __future__ import annotations

import torch
from torch import nn

from lrkd.models.lowrank.block import CLONE_TERMS
from lrkd.models.lowrank.clone import LowRankClone
from lrkd.models.students import StudentBuilder

__all__ = ["LowRankCloneBuilder"]


class LowRankCloneBuilder(StudentBuilder):
    """Builds a :class:`LowRankClone` of the teacher (use as ``model.student`` in a config).

    With ``init: activation_pca`` the builder requests a probe batch (:meth:`probe_request`):
    the DistillationModule tokenises ``probe_texts`` (or the built-in corpus) with the
    teacher's tokenizer (lrkd's ``data.probe.probe_batch``) and calls
    ``builder(teacher, probe_input_ids=ids)``.

    Args:
        hidden_size: the student's hidden size d_S (the rank), at most the teacher's and a
            multiple of its number of attention heads (e.g. 189 = 21 x 9 for SmolLM2).
        init: ``normal`` (paper), ``embedding_pca`` or ``activation_pca``; see
            :class:`LowRankClone`.
        init_std: standard deviation of the ``normal`` init.
        probe_texts: texts for ``activation_pca``; ``None`` uses the built-in corpus.
        probe_tokens: about how many probe tokens ``activation_pca`` uses.
        clone_terms: activation clone terms (``q, k, v, gate, up, attn_out, ffn_out``);
            weight them with ``model.loss.clone_weight``.
        clone_loss: ``mse`` (paper) or ``relative_mse`` (each term over the teacher
            activation's mean square).
        clone_target_grad: let gradients flow through the projection that maps teacher
            attention/FFN outputs into student space (official code); default: fixed target.
        attn_out_space: ``student`` (paper; default) or ``teacher`` (official code): where
            the attention-output clone term compares.
        tie_embedding_projection: one projection for embedding and LM head (official code's
            ``tie_word_emb_proj``); ``null`` ties when the teacher ties its embeddings.
        norm_eps: the student's RMSNorm epsilon; ``null`` keeps the teacher's.
        gradient_checkpointing: recompute each (teacher, student) layer pair in backward.
        cache_weights: generate weights once per optimizer step (recommended).
        seed: seed of the ``normal`` init.
    """

    uses_teacher_weights = True

    def __init__(
        self,
        hidden_size: int,
        init: str = "normal",
        init_std: float = 0.02,
        probe_texts: list[str] | None = None,
        probe_tokens: int = 8192,
        clone_terms: list[str] | None = None,
        clone_loss: str = "mse",
        clone_target_grad: bool = False,
        attn_out_space: str = "student",
        tie_embedding_projection: bool | None = None,
        norm_eps: float | None = None,
        gradient_checkpointing: bool = False,
        cache_weights: bool = True,
        seed: int | None = 0,
    ) -> None:
        self.probe_texts = None if probe_texts is None else list(probe_texts)
        self.probe_tokens = probe_tokens
        self.kwargs = dict(
            hidden_size=hidden_size,
            init=init,
            init_std=init_std,
            clone_terms=tuple(CLONE_TERMS if clone_terms is None else clone_terms),
            clone_loss=clone_loss,
            clone_target_grad=clone_target_grad,
            attn_out_space=attn_out_space,
            tie_embedding_projection=tie_embedding_projection,
            norm_eps=norm_eps,
            gradient_checkpointing=gradient_checkpointing,
            cache_weights=cache_weights,
            seed=seed,
        )

    def probe_request(self) -> tuple[list[str] | None, int] | None:
        """``(probe_texts, probe_tokens)`` for ``init: activation_pca``, else ``None``."""
        if self.kwargs["init"] != "activation_pca":
            return None
        return self.probe_texts, self.probe_tokens

    def __call__(
        self, teacher: nn.Module, probe_input_ids: torch.Tensor | None = None
    ) -> LowRankClone:
        """Build the clone of ``teacher``.

        Args:
            teacher: the frozen teacher.
            probe_input_ids: the probe batch :meth:`probe_request` asks for (token ids
                [B, L]); required with ``init: activation_pca``.

        Returns:
            The clone.

        Raises:
            ValueError: ``activation_pca`` without ``probe_input_ids``, or what
                :class:`LowRankClone` raises.
        """
        if self.probe_request() is not None and probe_input_ids is None:
            raise ValueError(
                "LowRankCloneBuilder: init=activation_pca requests a probe batch; call it as "
                "builder(teacher, probe_input_ids=probe_batch(tokenizer, "
                "*builder.probe_request())) (probe_batch from lrkd's data.probe module, the "
                "teacher's tokenizer; the DistillationModule does this), or use "
                "init=embedding_pca (no data needed)."
            )
        return LowRankClone(teacher, probe_input_ids=probe_input_ids, **self.kwargs)
