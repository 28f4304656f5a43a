"""Model shapes shared by the benchmarks: the LRC pair of the performance issue (a
Llama-3.2-3B teacher and its 1536-wide clone) and the teacher's config, built in code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """Teacher and student sizes of one benchmark (Llama family).

    Attributes:
        vocab: Vocabulary size V.
        teacher_hidden: Teacher hidden size d_T.
        student_hidden: Student hidden size d_S.
        layers: Decoder layers L (teacher and student).
        heads: Attention heads (teacher and student).
        kv_heads: Key/value heads (teacher and student).
        head_dim: Width of one head.
        ffn: FFN (intermediate) width F (teacher and student).
        tied: Whether the embeddings are tied to the LM head.
        seq: Tokens per sequence.
    """

    vocab: int
    teacher_hidden: int
    student_hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tied: bool
    seq: int

    @property
    def q(self) -> int:
        """Query width heads * head_dim."""
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        """Key (or value) width kv_heads * head_dim."""
        return self.kv_heads * self.head_dim


# Llama-3.2-3B (tied embeddings) and its clone of hidden 1536 (LRC-1.5B), at sequence 2048.
LLAMA_3B_LRC = Shape(
    vocab=128_256,
    teacher_hidden=3072,
    student_hidden=1536,
    layers=28,
    heads=24,
    kv_heads=8,
    head_dim=128,
    ffn=8192,
    tied=True,
    seq=2048,
)


def teacher_config(shape: Shape) -> Any:
    """The teacher's ``LlamaConfig``, built in code (no Hub access)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.teacher_hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=max(2048, shape.seq),
        tie_word_embeddings=shape.tied,
        use_cache=False,
    )
