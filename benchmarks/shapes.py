"""Model shapes shared by the benchmarks: the LRC pair of the performance issue (a
Llama-3.2-3B teacher and its 1536-wide clone), the pairs of the real-scale recipes in
configs/lrc/ (Qwen2.5-3B -> 1200, Qwen3-4B -> 1280), and the teacher's config, built in code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """Teacher and student sizes of one benchmark.

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
        family: The teacher's transformers ``model_type``: ``llama``, ``qwen2`` (q/k/v
            biases) or ``qwen3`` (q/k RMSNorms over head_dim).
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
    family: str = "llama"

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


# Qwen2.5-3B(-Instruct) (q/k/v biases, tied) and its clone of hidden 1200 (the paper's LRC-1.7B).
QWEN25_3B_LRC = Shape(
    vocab=151_936,
    teacher_hidden=2048,
    student_hidden=1200,
    layers=36,
    heads=16,
    kv_heads=2,
    head_dim=128,
    ffn=11_008,
    tied=True,
    seq=2048,
    family="qwen2",
)

# Qwen3-4B (q/k norms, tied) and its half-width clone of hidden 1280 (lrkd's choice).
QWEN3_4B_LRC = Shape(
    vocab=151_936,
    teacher_hidden=2560,
    student_hidden=1280,
    layers=36,
    heads=32,
    kv_heads=8,
    head_dim=128,
    ffn=9728,
    tied=True,
    seq=2048,
    family="qwen3",
)

#: The named pairs (``benchmarks/memory_table.py --pair NAME``).
PAIRS: dict[str, Shape] = {
    "llama3.2-3b": LLAMA_3B_LRC,
    "qwen2.5-3b": QWEN25_3B_LRC,
    "qwen3-4b": QWEN3_4B_LRC,
}

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3")


def teacher_config(shape: Shape) -> Any:
    """The teacher's transformers config of ``shape.family``, built in code (no Hub access).

    Only the sizes are set (RoPE and norm epsilons do not change parameter counts or shapes).

    Raises:
        ValueError: an unknown family, or a Qwen2 shape whose head_dim is not
            hidden / heads (Qwen2 derives it).
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if shape.family not in classes:
        raise ValueError(f"family={shape.family!r}; choose one of {', '.join(classes)}")
    head_dim = {"head_dim": shape.head_dim}
    if shape.family == "qwen2":
        if shape.teacher_hidden != shape.heads * shape.head_dim:
            raise ValueError("qwen2: head_dim must be teacher_hidden / heads")
        head_dim = {}
    return classes[shape.family](
        vocab_size=shape.vocab,
        hidden_size=shape.teacher_hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        **head_dim,
        max_position_embeddings=max(2048, shape.seq),
        tie_word_embeddings=shape.tied,
        use_cache=False,
    )
