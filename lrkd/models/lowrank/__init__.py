"""Low-Rank Clone (LRC): a student whose weights are generated from the frozen teacher.

For every decoder layer ``i`` and every linear ``m`` in q, k, v, o, gate, up, down there is a
trained projection ``P[i, m]`` of shape ``(d_T, d_S)`` acting on the hidden side of the teacher's
weight (``nn.Linear`` weights are ``[out, in]``)::

    q, k, v, gate, up (hidden is the input):   W_S = W_T @ P              [out, d_S]
    o, down           (hidden is the output):  W_S = P^T @ W_T            [d_S, in]
    embedding and LM head:                     E_S = E_T @ P_emb          [vocab, d_S]

Only the hidden size shrinks; layer count, heads, head_dim, FFN width and vocabulary stay the
teacher's. Trainable: the projections and the student's RMSNorm gains. The teacher's weights are
referenced (never copied) and stay frozen.

The student runs through the teacher family's own transformers decoder layers (attention, RoPE,
GQA, masks, sdpa): the clone holds a set of decoder layers built from the student config whose
linear weights are replaced by the generated tensors. Teacher and student run layer by layer
together so that the activation clone loss of layer ``i`` is taken as soon as both activations
exist; the teacher's activations are never kept for all layers.

``materialize()`` multiplies the projections out once and returns a plain transformers model of
the teacher's family with ``hidden_size = d_S`` and an explicit ``head_dim``.

Weight generation costs ``d_out * d_T * d_S`` multiply-adds per weight, independent of the
batch. With ``cache_weights=True`` the generated weights are made once per optimizer step (as
leaf tensors that accumulate gradients over micro-batches) and
:meth:`LowRankClone.flush_weight_grads` turns those gradients into projection gradients once,
just before the optimizer step (the DistillationModule calls it).

The ``activation_pca`` initialisation runs the teacher on a probe batch of token ids that the
caller gives (``probe_input_ids``, e.g. from lrkd's ``data.probe.probe_batch``); the model
never tokenises text itself (nothing under ``lrkd/models`` imports the data layer).
:class:`LowRankCloneBuilder` asks the DistillationModule for one
(:meth:`~lrkd.models.students.StudentBuilder.probe_request`).

Modules, one concept each (each imports only the ones above it; ``clone`` is named below it
for type hints only):

- :mod:`~lrkd.models.lowrank.weights`: how a student tensor is generated (and its gradient).
- :mod:`~lrkd.models.lowrank.family`: supported teachers and the clone's config.
- :mod:`~lrkd.models.lowrank.cache`: the per-optimizer-step generated-weight cache.
- :mod:`~lrkd.models.lowrank.block`: :class:`CloneBlock`, one teacher/student layer pair and
  its clone terms.
- :mod:`~lrkd.models.lowrank.inits`: the projection initialisations.
- :mod:`~lrkd.models.lowrank.sharding`: FSDP2 sharding of clone and teacher.
- :mod:`~lrkd.models.lowrank.export`: ``materialize``.
- :mod:`~lrkd.models.lowrank.clone`: :class:`LowRankClone`.
- :mod:`~lrkd.models.lowrank.builder`: :class:`LowRankCloneBuilder`.
"""

from lrkd.models.lowrank.block import (
    ATTN_OUT_SPACES,
    CLONE_LOSSES,
    CLONE_TERMS,
    CloneBlock,
    CloneTerms,
)
from lrkd.models.lowrank.builder import LowRankCloneBuilder
from lrkd.models.lowrank.cache import WeightCache
from lrkd.models.lowrank.clone import LowRankClone, LowRankCloneOutput
from lrkd.models.lowrank.family import SUPPORTED_FAMILIES, student_config_for
from lrkd.models.lowrank.inits import INITS
from lrkd.models.lowrank.weights import GeneratedTensor

__all__ = [
    "ATTN_OUT_SPACES",
    "CLONE_LOSSES",
    "CLONE_TERMS",
    "INITS",
    "SUPPORTED_FAMILIES",
    "CloneBlock",
    "CloneTerms",
    "GeneratedTensor",
    "LowRankClone",
    "LowRankCloneBuilder",
    "LowRankCloneOutput",
    "WeightCache",
    "student_config_for",
]
