"""Per-device memory by training strategy for a Low-Rank Clone (LRC) pair, from parameter counts.

Computed, not measured: the script counts parameters exactly (transformers models built on the
meta device; the LRC trainable count from its formula, checked against the real
:class:`lrkd.models.lowrank.LowRankClone` on tiny Llamas, Qwen2s and Qwen3s) and multiplies them
by bytes per parameter. The default pair is Llama-3.2-3B (hidden 3072, 28 layers, 24 heads, 8 KV
heads, head_dim 128, FFN 8192, vocab 128256, tied embeddings) -> student hidden 1536; ``--pair``
picks one of the real-scale recipes' pairs (``benchmarks/shapes.py``: ``llama3.2-3b``,
``qwen2.5-3b`` -> 1200, ``qwen3-4b`` -> 1280), ``--family`` the teacher family of a shape given
size by size.

What the LRC holds (L layers, teacher hidden d_T, student hidden d_S)::

    trainable = L * 7 * d_T * d_S          # P for q, k, v, o, gate, up, down of every layer
              + d_T * d_S                  # embedding projection
              + d_T * d_S   (untied only)  # LM-head projection
              + (2 * L + 1) * d_S          # student RMSNorm gains
              + 2 * L * head_dim (qwen3 only)  # the student's q/k norm gains (from the teacher's)
    generated = the materialised student's weights without its norms (a plain model of the
                teacher's family with hidden d_S and the teacher's heads, head_dim, FFN and
                vocabulary; Qwen2's q/k/v biases are the teacher's, copied, and counted here)

Model-state bytes per device, bf16-mixed precision, AdamW (the rows of the table):

- frozen teacher: 2 B/param (bf16), no gradient, no optimizer state; trainable: fp32 master 4
  + fp32 gradient 4 + two fp32 AdamW moments 8 = 16 B/param. One device / DDP: replicated.
- FSDP2 (``LowRankClone.fully_shard``): teacher and student fully sharded (both / N),
  gathered in bf16, gradients reduce-scattered in fp32. A layer unit (``CloneBlock``: teacher
  layer i, its 7 projections, student layer i's norms) gathered in bf16, plus student layer
  i's generated weights (bf16, since made from bf16-gathered tensors) and their bf16 gradient,
  plus the unit's unsharded projection gradient (bf16 and its fp32 copy for the
  reduce-scatter). The root unit (teacher embedding = tied head, final norms, embedding
  projection) is never resharded after forward, and the generated student embedding is used
  first (lookup) and last (LM head), so both are held for the whole step. Working set = root
  unit + one layer unit (no prefetch) or two (prefetch). With per-layer checkpointing the
  generation runs inside the checkpoint; without it every layer's generated weights are saved
  for backward.
- ``cache_weights`` on one device (lrkd's default at N = 1): all generated weights kept for the
  step as leaf tensors in the autocast dtype (bf16) with bf16 gradients.
- DDP as lrkd runs it at N >= 2: ``DistillationModule.setup`` turns ``cache_weights`` off and
  the weights are generated inside autograd in bf16: the generated weights live until
  backward (the bf16 teacher matrices they are made from are saved by reference, not copied).
  The embedding's are made outside the layer loop, so they are always kept; the layers' are
  made inside each block, so per-layer checkpointing keeps only the one being recomputed. Plus
  DDP's fp32 gradient buckets (Lightning leaves ``gradient_as_bucket_view`` off).

Listed but not added to the rows (they do not coincide with the whole row): the bf16 copy of
the fp32 projections made for each generation.

Activations are not in the model-state table. A separate rough estimate, per token, for the
teacher forward (no grad) and the student with per-layer (teacher, student) pair checkpointing,
one device with ``cache_weights``::

    A_token = L * (4 * d_S + 2 * d_T)            # pair checkpoint inputs: student residual
                                                 # (fp32 with cache_weights) and teacher (bf16)
            + 2 * (4*d_S + 3*q + 3*kv + 4*F)     # one student layer recomputed in backward
            + 4 * (q + 2*kv + 2*F + 2*d_S)       # its clone-loss differences (fp32)
            + 2 * (d_T + q + 2*kv + 2*F)         # teacher layer outputs in flight (bf16)
            + 3 * 2 * V                          # student logits, teacher logits, logit grad
    A = A_token * seq * micro_batch

with q = heads * head_dim, kv = kv_heads * head_dim, F = FFN width, V = vocabulary. It assumes
sdpa's flash / memory-efficient kernels (no seq x seq scores) and ignores the chunked KD loss's
bounded fp32 temporaries, the optimizer's foreach temporaries, allocator fragmentation and the
CUDA context.

Example::

    python benchmarks/memory_table.py --world-sizes 1 2 4 8 --seq 2048 --micro-batch 1
    python benchmarks/memory_table.py --pair qwen3-4b --world-sizes 8 --seq 2048 --micro-batch 3
    python benchmarks/memory_table.py --tiny
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from shapes import FAMILIES, LLAMA_3B_LRC, PAIRS, Shape, teacher_config

BF16 = 2
FP32 = 4
TRAINABLE_BYTES = 16  # fp32 master + fp32 grad + 2 fp32 AdamW moments
REDUCE_BYTES = BF16 + FP32  # an unsharded gradient in bf16 and its fp32 copy for reduce-scatter
GIB = 2**30
MIB = 2**20
N_LINEARS = 7  # q, k, v, o, gate, up, down

TINY = dict(
    teacher_hidden=64,
    student_hidden=32,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=16,
    ffn=128,
    vocab=128,
)


@dataclass(frozen=True)
class Counts:
    """Exact parameter counts of one transformers causal LM.

    Attributes:
        total: all parameters (a tied head counted once).
        embed: the input embedding.
        head: the LM head if untied, else 0.
        layer: one decoder layer.
        layer_norms: the RMSNorm gains of one decoder layer.
        final_norm: the final RMSNorm.
        layers: the number of decoder layers.
    """

    total: int
    embed: int
    head: int
    layer: int
    layer_norms: int
    final_norm: int
    layers: int

    @property
    def layer_linears(self) -> int:
        """Parameters of one layer's seven linears."""
        return self.layer - self.layer_norms

    @property
    def matrices(self) -> int:
        """Everything but the norms: the tensors an LRC generates (student) or reads (teacher)."""
        return self.layers * self.layer_linears + self.embed + self.head


@dataclass(frozen=True)
class LrcCounts:
    """Trainable parameters of an LRC student.

    Attributes:
        layer_projections: one layer's 7 projections.
        embed_projection: the embedding projection.
        head_projection: the LM-head projection (0 when the teacher is tied).
        layer_norms: one student layer's RMSNorm gains (2, plus Qwen3's q/k norms).
        final_norm: the student's final RMSNorm gain.
        layers: the number of layers.
    """

    layer_projections: int
    embed_projection: int
    head_projection: int
    layer_norms: int
    final_norm: int
    layers: int

    @property
    def total(self) -> int:
        """All trainable parameters."""
        return (
            self.layers * (self.layer_projections + self.layer_norms)
            + self.embed_projection
            + self.head_projection
            + self.final_norm
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.

    Returns:
        The parsed arguments (the ``--pair`` or ``--tiny`` sizes replace the model sizes).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = asdict(LLAMA_3B_LRC)
    parser.add_argument("--teacher-hidden", type=int, default=d["teacher_hidden"])
    parser.add_argument("--student-hidden", type=int, default=d["student_hidden"])
    parser.add_argument("--layers", type=int, default=d["layers"], help="Decoder layers.")
    parser.add_argument("--heads", type=int, default=d["heads"], help="Attention heads.")
    parser.add_argument("--kv-heads", type=int, default=d["kv_heads"], help="KV heads.")
    parser.add_argument("--head-dim", type=int, default=d["head_dim"])
    parser.add_argument("--ffn", type=int, default=d["ffn"], help="FFN (intermediate) width.")
    parser.add_argument("--vocab", type=int, default=d["vocab"], help="Vocabulary size.")
    parser.add_argument(
        "--untied", action="store_true", help="Untied teacher embeddings (adds a head P)."
    )
    parser.add_argument("--family", choices=FAMILIES, default=d["family"], help="Teacher family.")
    parser.add_argument(
        "--pair", choices=sorted(PAIRS), help="A named pair (its sizes replace the model sizes)."
    )
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seq", type=int, default=2048, help="Tokens per sequence.")
    parser.add_argument("--micro-batch", type=int, default=1, help="Sequences per micro-batch.")
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes (smoke test).")
    args = parser.parse_args(argv)
    if args.pair is not None:
        pair = asdict(PAIRS[args.pair])
        for key in ("seq", "tied"):
            pair.pop(key)
        for key, value in pair.items():
            setattr(args, key, value)
        args.untied = not PAIRS[args.pair].tied
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def shape_of(args: argparse.Namespace) -> Shape:
    """The shape the command line describes."""
    sizes = {f.name: getattr(args, f.name) for f in fields(Shape) if hasattr(args, f.name)}
    return Shape(**sizes, tied=not args.untied)


def count_params(config: Any) -> Counts:
    """Counts a causal LM's parameters exactly by building it on the meta device.

    Args:
        config: A transformers config of a Llama-like causal LM (Llama, Qwen2, Qwen3).

    Returns:
        The counts (a layer's norms: every module of it whose name ends in ``norm``, Qwen3's
        q/k norms too); their sum is checked against the model's own parameter total.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = model.model.layers[0]
    norms = sum(
        p.numel()
        for name, module in layer.named_modules()
        if name.endswith("norm")
        for p in module.parameters()
    )
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    counts = Counts(
        total=sum(p.numel() for p in model.parameters()),
        embed=model.model.embed_tokens.weight.numel(),
        head=0 if tied else model.lm_head.weight.numel(),
        layer=sum(p.numel() for p in layer.parameters()),
        layer_norms=norms,
        final_norm=model.model.norm.weight.numel(),
        layers=len(model.model.layers),
    )
    parts = counts.layers * counts.layer + counts.embed + counts.head + counts.final_norm
    if parts != counts.total:
        raise RuntimeError(f"count_params: parts {parts:,} != total {counts.total:,}")
    return counts


def lrc_counts(
    d_teacher: int, d_student: int, layers: int, tied: bool, qk_norm_dim: int = 0
) -> LrcCounts:
    """The LRC trainable parameters by formula.

    Biases (Qwen2's q/k/v) are on the input side, so the clone copies the teacher's and trains
    none; Qwen3's q/k norms act over head_dim, and the clone trains its own gains, initialised
    from the teacher's.

    Args:
        d_teacher: Teacher hidden size d_T.
        d_student: Student hidden size d_S.
        layers: Number of decoder layers.
        tied: Whether the teacher's embeddings are tied (then no head projection).
        qk_norm_dim: head_dim for a teacher with q/k norms (Qwen3), else 0.

    Returns:
        The counts.
    """
    proj = d_teacher * d_student
    return LrcCounts(
        layer_projections=N_LINEARS * proj,
        embed_projection=proj,
        head_projection=0 if tied else proj,
        layer_norms=2 * d_student + 2 * qk_norm_dim,
        final_norm=d_student,
        layers=layers,
    )


def check_on_tiny() -> list[str]:
    """Checks the formulas against the real LowRankClone on tiny teachers: tied and untied
    Llamas, a tied Qwen2 (q/k/v biases) and a tied Qwen3 (q/k norms).

    The tiny teacher is tests/conftest.py's (vocab 128, hidden 64, FFN 128, 2 layers, 4/2
    heads, head_dim 16) in each family; the student has hidden 32. Asserts that the clone's
    trainable parameters equal :func:`lrc_counts` and that its materialised model has the
    meta-counted size of ``student_config_for(teacher, 32)``.

    Returns:
        One line per checked configuration.
    """
    from transformers import AutoModelForCausalLM

    from lrkd.models.lowrank import LowRankClone, student_config_for

    lines = []
    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    for family, tied in (("llama", True), ("llama", False), ("qwen2", True), ("qwen3", True)):
        tiny = {**TINY, "tied": tied, "seq": 256, "family": family}  # conftest's tiny sizes
        config = teacher_config(Shape(**tiny))
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(config).eval()
        clone = LowRankClone(teacher, hidden_size=32, seed=0)
        trainable = sum(p.numel() for p in clone.parameters() if p.requires_grad)
        qk_norm = TINY["head_dim"] if family == "qwen3" else 0
        formula = lrc_counts(64, 32, 2, tied, qk_norm).total
        what = f"{'tied' if tied else 'untied'} {names[family]}"
        if trainable != formula:
            raise RuntimeError(f"{what}: LowRankClone trainable {trainable} != {formula}")
        materialised = sum(p.numel() for p in clone.materialize().parameters())
        meta = count_params(student_config_for(config, 32)).total
        if materialised != meta:
            raise RuntimeError(f"{what}: materialize() {materialised} != meta {meta}")
        lines.append(
            f"tiny {what} 64 -> 32: LowRankClone trainable "
            f"{trainable:,} = formula; materialize() {materialised:,} = meta count"
        )
    return lines


@dataclass(frozen=True)
class Group:
    """Named byte counts that make up one part of a row.

    Attributes:
        title: What the group is.
        items: Bytes per component (added to the rows that use the group).
        transient: Bytes per component listed for information, not added to any row.
    """

    title: str
    items: dict[str, float]
    transient: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """The bytes the rows add for this group."""
        return sum(self.items.values())


@dataclass(frozen=True)
class Groups:
    """Every component group of the table (bytes per device, before any division by N)."""

    persistent: Group
    fsdp_layer: Group
    fsdp_root: Group
    fsdp_no_ckpt: Group
    cache: Group
    ddp_step: Group
    ddp_layer: Group


def groups(teacher: Counts, student: Counts, lrc: LrcCounts) -> Groups:
    """Bytes of each component under the stated assumptions.

    Args:
        teacher: The teacher's counts.
        student: The materialised student's counts.
        lrc: The LRC trainable counts.

    Returns:
        The component groups.
    """
    largest_projection = max(lrc.embed_projection, lrc.layer_projections // 7)
    projection_cast = {
        "bf16 copy of one projection while generating (largest)": BF16 * largest_projection
    }
    unit_trainable = lrc.layer_projections + lrc.layer_norms
    norms = 2 if lrc.layer_norms == 2 * lrc.final_norm else 4  # Qwen3: + q/k norms
    root_trainable = lrc.embed_projection + lrc.head_projection + lrc.final_norm
    s_embed = student.embed + student.head
    t_embed = teacher.embed + teacher.head
    persistent = Group(
        "persistent model state (replicated; / N under FSDP2)",
        {
            "teacher weights (bf16)": BF16 * teacher.total,
            "trainable: fp32 master + grad + AdamW moments (16 B)": TRAINABLE_BYTES * lrc.total,
        },
    )
    fsdp_layer = Group(
        "FSDP2 layer unit (CloneBlock)",
        {
            "teacher layer (bf16, gathered)": BF16 * teacher.layer,
            f"7 projections + {norms} student norms (bf16, gathered)": BF16 * unit_trainable,
            "generated student layer weights (bf16)": BF16 * student.layer_linears,
            "their gradient (bf16, backward)": BF16 * student.layer_linears,
            "unsharded projection gradient (bf16 + fp32 copy to reduce)": REDUCE_BYTES
            * unit_trainable,
        },
    )
    fsdp_root = Group(
        "FSDP2 root unit (held for the whole step)",
        {
            "teacher embedding/head + final norm (bf16, gathered)": BF16
            * (t_embed + teacher.final_norm),
            "embedding projection + student final norm (bf16, gathered)": BF16 * root_trainable,
            "generated student embedding (bf16)": BF16 * s_embed,
            "its gradient (bf16, backward)": BF16 * s_embed,
            "unsharded projection gradient (bf16 + fp32 copy to reduce)": REDUCE_BYTES
            * root_trainable,
        },
    )
    others = max(lrc.layers - 2, 0)
    fsdp_no_ckpt = Group(
        "FSDP2 without checkpointing, extra",
        {
            f"generated weights of the other {others} layers (bf16, saved for backward)": BF16
            * others
            * student.layer_linears
        },
    )
    cache = Group(
        "`cache_weights` on one device, extra",
        {
            "cached generated weights (bf16)": BF16 * student.matrices,
            "their gradients (bf16)": BF16 * student.matrices,
        },
        projection_cast,
    )
    ddp_step = Group(
        "lrkd DDP at N ≥ 2, extra for every step",
        {
            "DDP gradient buckets (fp32)": FP32 * lrc.total,
            "generated student embedding (bf16)": BF16 * s_embed,
            "one layer's generated-weight gradient (bf16, backward)": BF16 * student.layer_linears,
        },
        projection_cast,
    )
    ddp_layer = Group(
        "lrkd DDP at N ≥ 2, per layer held (1 with checkpointing, L without)",
        {
            "generated student layer weights (bf16)": BF16 * student.layer_linears,
        },
    )
    return Groups(persistent, fsdp_layer, fsdp_root, fsdp_no_ckpt, cache, ddp_step, ddp_layer)


def rows(g: Groups, layers: int) -> list[tuple[str, Callable[[int], float | None]]]:
    """The strategies of the table and their bytes per device at world size N.

    Args:
        g: The component groups.
        layers: The number of decoder layers.

    Returns:
        (label, bytes as a function of N, ``None`` where the row does not apply).
    """
    p = g.persistent.total
    root_1, root_2 = (
        g.fsdp_root.total + g.fsdp_layer.total,
        g.fsdp_root.total + 2 * g.fsdp_layer.total,
    )
    return [
        ("single device / DDP, persistent only (replicated)", lambda n: p),
        ("FSDP2 full shard, persistent only (/ N)", lambda n: p / n),
        ("FSDP2 + root unit + 1 layer unit (checkpointing, no prefetch)", lambda n: p / n + root_1),
        ("FSDP2 + root unit + 2 layer units (checkpointing, prefetch)", lambda n: p / n + root_2),
        (
            "FSDP2 + root unit + 2 layer units, no checkpointing",
            lambda n: p / n + root_2 + g.fsdp_no_ckpt.total,
        ),
        (
            "one device, `cache_weights` (lrkd's default at N = 1)",
            lambda n: p + g.cache.total if n == 1 else None,
        ),
        (
            "DDP as lrkd runs it (N ≥ 2, cache off), checkpointing",
            lambda n: p + g.ddp_step.total + g.ddp_layer.total if n >= 2 else None,
        ),
        (
            "DDP as lrkd runs it (N ≥ 2, cache off), no checkpointing",
            lambda n: p + g.ddp_step.total + layers * g.ddp_layer.total if n >= 2 else None,
        ),
    ]


def activation_bytes_per_token(args: argparse.Namespace) -> dict[str, float]:
    """The rough per-token activation estimate of the module docstring.

    Args:
        args: The parsed command line (model sizes).

    Returns:
        Bytes per token of each term.
    """
    d_t, d_s, f, v = args.teacher_hidden, args.student_hidden, args.ffn, args.vocab
    q, kv = args.heads * args.head_dim, args.kv_heads * args.head_dim
    return {
        "pair checkpoint inputs, all layers: L·(4·d_S + 2·d_T)": args.layers * (4 * d_s + 2 * d_t),
        "one student layer recomputed: 2·(4·d_S + 3·q + 3·kv + 4·F)": BF16
        * (4 * d_s + 3 * q + 3 * kv + 4 * f),
        "its clone-loss differences: 4·(q + 2·kv + 2·F + 2·d_S)": FP32
        * (q + 2 * kv + 2 * f + 2 * d_s),
        "teacher layer outputs in flight: 2·(d_T + q + 2·kv + 2·F)": BF16
        * (d_t + q + 2 * kv + 2 * f),
        "student + teacher logits + logit grad: 3·2·V": 3 * BF16 * v,
    }


def fmt_bytes(n: float, unit: int) -> str:
    """Formats bytes in the table's unit with two decimals."""
    return f"{n / unit:.2f}"


def fmt_params(n: int) -> str:
    """Formats a parameter count exactly and in millions."""
    return f"{n:,} ({n / 1e6:,.1f} M)"


def model_state_table(
    g: Groups, layers: int, world_sizes: Sequence[int], unit: int, name: str
) -> list[str]:
    """The per-device model-state table (rows: strategies, columns: world sizes).

    Args:
        g: The component groups.
        layers: The number of decoder layers.
        world_sizes: The world sizes N.
        unit: Bytes per displayed unit.
        name: The unit's name.

    Returns:
        Markdown lines.
    """
    lines = [
        f"| Strategy (model state per device, {name}) | "
        + " | ".join(f"N = {n}" for n in world_sizes)
        + " |",
        "|---|" + "---:|" * len(world_sizes),
    ]
    for label, value in rows(g, layers):
        cells = [value(n) for n in world_sizes]
        text = ["—" if c is None else fmt_bytes(c, unit) for c in cells]
        lines.append(f"| {label} | " + " | ".join(text) + " |")
    return lines


def counts_table(teacher: Counts, student: Counts, lrc: LrcCounts) -> list[str]:
    """The exact parameter counts.

    Args:
        teacher: The teacher's counts.
        student: The materialised student's counts.
        lrc: The LRC trainable counts.

    Returns:
        Markdown lines.
    """
    qk = "" if lrc.layer_norms == 2 * lrc.final_norm else " + 2L × head_dim (q/k norms)"
    return [
        "| Parameters | Count |",
        "|---|---:|",
        f"| teacher (frozen) | {fmt_params(teacher.total)} |",
        f"| student, materialised | {fmt_params(student.total)} |",
        f"| · of which generated weights (all but the norms) | {fmt_params(student.matrices)} |",
        f"| LRC trainable | {fmt_params(lrc.total)} |",
        f"| · layer projections, L × 7 × d_T × d_S | "
        f"{fmt_params(lrc.layers * lrc.layer_projections)} |",
        f"| · embedding (+ head) projection | "
        f"{fmt_params(lrc.embed_projection + lrc.head_projection)} |",
        f"| · student norms, (2L + 1) × d_S{qk} | "
        f"{fmt_params(lrc.layers * lrc.layer_norms + lrc.final_norm)} |",
    ]


def components_table(g: Groups, unit: int, name: str) -> list[str]:
    """The pieces every row is made of.

    Args:
        g: The component groups.
        unit: Bytes per displayed unit.
        name: The unit's name.

    Returns:
        Markdown lines.
    """
    lines = [f"| Component | {name} |", "|---|---:|"]
    for group in (
        g.persistent,
        g.fsdp_layer,
        g.fsdp_root,
        g.fsdp_no_ckpt,
        g.cache,
        g.ddp_step,
        g.ddp_layer,
    ):
        lines.append(f"| **{group.title}** | **{fmt_bytes(group.total, unit)}** |")
        lines.extend(f"| · {k} | {fmt_bytes(v, unit)} |" for k, v in group.items.items())
        lines.extend(
            f"| · not in the rows (transient): {k} | ({fmt_bytes(v, unit)}) |"
            for k, v in group.transient.items()
        )
    return lines


def activation_table(args: argparse.Namespace, unit: int, name: str) -> list[str]:
    """The rough activation estimate, per token and for ``seq × micro_batch`` tokens.

    Args:
        args: The parsed command line.
        unit: Bytes per displayed unit for the batch column.
        name: The unit's name.

    Returns:
        Markdown lines.
    """
    tokens = args.seq * args.micro_batch
    terms = activation_bytes_per_token(args)
    lines = [
        f"| Activation term (ESTIMATE, bytes) | per token (KiB) | × {tokens} tokens ({name}) |",
        "|---|---:|---:|",
    ]
    for k, v in terms.items():
        lines.append(f"| {k} | {v / 1024:,.1f} | {fmt_bytes(v * tokens, unit)} |")
    total = sum(terms.values())
    batch = fmt_bytes(total * tokens, unit)
    lines.append(f"| **total (estimate)** | **{total / 1024:,.1f}** | **{batch}** |")
    return lines


ASSUMPTIONS = """\
Assumptions (computed from exact parameter counts, not measured):
- bf16-mixed precision, AdamW. Teacher: bf16 weights (2 B/param), frozen: no gradient, no
  optimizer state. Trainable LRC parameters: fp32 master 4 + fp32 gradient 4 + two fp32 AdamW
  moments 8 = 16 B/param.
- FSDP2 (`LowRankClone.fully_shard`): teacher and student sharded (both / N), gathered in bf16,
  gradients reduce-scattered in fp32. Layer unit = (teacher layer i, its 7 projections,
  student layer i's norms) gathered + student layer i's generated weights (bf16) and their
  bf16 gradient + the unit's unsharded projection gradient (bf16 and its fp32 copy). The root
  unit (tied teacher embedding/head, final norms, embedding projection) and the generated
  student embedding with its gradient are held for the whole step. Prefetch holds two layer
  units. Without checkpointing every layer's generated weights are saved for backward.
- `cache_weights` (lrkd's default at N = 1): every generated weight kept for the step as a leaf
  tensor in the autocast dtype (bf16) with a bf16 gradient.
- At N >= 2 lrkd turns `cache_weights` off (DistillationModule.setup): weights are generated
  inside autograd in bf16 and kept until backward (the bf16 teacher matrices they come from
  are saved by reference): always for the embedding, for one layer at a time with per-layer
  checkpointing, for every layer without. Plus DDP's fp32 gradient buckets
  (gradient_as_bucket_view off).
- Model state only: activations, logits, the KD loss's chunk temporaries, the optimizer's
  foreach temporaries, allocator fragmentation and the CUDA context are NOT included.
  Transients listed in parentheses under the components are not added to any row."""


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the tables.

    Args:
        argv: Arguments; ``None`` reads ``sys.argv``.
    """
    args = parse_args(argv)
    from lrkd.models.lowrank import student_config_for

    checks = check_on_tiny()
    t_config = teacher_config(shape_of(args))
    teacher = count_params(t_config)
    student = count_params(student_config_for(t_config, args.student_hidden))
    qk_norm = args.head_dim if args.family == "qwen3" else 0
    lrc = lrc_counts(
        args.teacher_hidden, args.student_hidden, args.layers, not args.untied, qk_norm
    )
    g = groups(teacher, student, lrc)
    unit, name = (GIB, "GiB") if g.persistent.total >= GIB else (MIB, "MiB")

    family = "" if args.family == "llama" else f" ({args.family})"
    print(
        f"LRC{family}: teacher hidden {args.teacher_hidden} -> "
        f"student hidden {args.student_hidden}, "
        f"{args.layers} layers, {args.heads}/{args.kv_heads} heads x {args.head_dim}, "
        f"FFN {args.ffn}, vocab {args.vocab}, {'untied' if args.untied else 'tied'} embeddings"
    )
    print()
    print("\n".join(model_state_table(g, args.layers, args.world_sizes, unit, name)))
    print()
    print(ASSUMPTIONS)
    print()
    print("\n".join(counts_table(teacher, student, lrc)))
    print()
    print("\n".join(components_table(g, unit, name)))
    print()
    print(
        "Activations (NOT included above; a rough ESTIMATE for one device with cache_weights, "
        f"seq {args.seq} x micro-batch {args.micro_batch}, teacher forward without grad, "
        "student with per-layer pair checkpointing, sdpa flash/efficient attention):"
    )
    print()
    print("\n".join(activation_table(args, unit, name)))
    print()
    print("Checks: " + "; ".join(checks))


if __name__ == "__main__":
    main()
