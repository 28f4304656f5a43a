"""Scale-out: the strategies lrkd configures, and how teacher and student are sharded.

Three Lightning strategies run the same ``lrkd fit`` config on many devices (see
docs/multi-gpu.md and ``configs/strategies/``):

- ``ddp``: every rank holds the teacher and the student; gradients are all-reduced.
- :class:`FSDP2Strategy` (Lightning's ``ModelParallelStrategy`` with a pure data-parallel mesh):
  :meth:`lrkd.module.DistillationModule.configure_model` shards teacher and student with
  FSDP2's ``fully_shard`` through :func:`shard_fsdp2`. CPU (gloo) and CUDA.
- :class:`LayerWiseFSDPStrategy` (Lightning's ``FSDPStrategy``, FSDP1, CUDA only): every decoder
  layer of teacher and student is a unit, found on the models at setup.

Generation (pass-rate estimation, on-policy rollouts, teacher responses) runs on a gathered,
unsharded copy of the model on every rank (:func:`gathered_copy`), so ranks sample their own
prompts independently; see docs/multi-gpu.md for the cost.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lrkd._compat import (
    fsdp1_kwargs,
    model_parallel_sizes,
    no_split_module_names,
    resolve_auto_data_parallel,
)
from lrkd.models.protocols import CoRunStudent, SelfSharding

log = logging.getLogger("lrkd")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``, the natural sharding units.

    Hugging Face models name their layer class (:func:`lrkd._compat.no_split_module_names`);
    otherwise the children of the largest ``nn.ModuleList`` are taken.
    """
    names = no_split_module_names(model)
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def layer_classes(*models: nn.Module) -> set[type[nn.Module]]:
    """The classes of the decoder layers (:func:`decoder_layers`) of ``models``: FSDP1's units."""
    return {type(layer) for model in models for layer in decoder_layers(model)}


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local_numel(model: nn.Module, trainable: bool = False) -> int:
    """How many of ``model``'s parameter elements this rank holds (its shards under FSDP2),
    counting only those that require grad with ``trainable``."""
    from torch.distributed.tensor import DTensor

    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel()
        for p in model.parameters()
        if p.requires_grad or not trainable
    )


def _shard_layers_and_root(
    model: nn.Module, mesh: Any, mp_policy: Any, reshard_after_forward: bool, root_reshard: bool
) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(
            layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward
        )
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=root_reshard)


def shard_fsdp2(
    teacher: nn.Module,
    student: nn.Module,
    mesh: Any,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> None:
    """Shard a frozen teacher and its student with FSDP2 over ``mesh``.

    A :class:`~lrkd.models.protocols.SelfSharding` student (a
    :class:`~lrkd.models.lowrank.LowRankClone`, which shards its teacher with it, one unit per
    (teacher layer, projections, student layer) block) does it itself. Any other student, and the
    teacher, are sharded one unit per decoder layer plus a root unit. The teacher has no
    gradients, so FSDP2 gives it neither gradient buffers nor optimizer state.

    Raises:
        ValueError: the teacher is not frozen.
        RuntimeError: a teacher parameter is left unsharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if any(p.requires_grad for p in teacher.parameters()):
        raise ValueError("shard_fsdp2: the teacher must be frozen (lrkd.models.teachers.freeze)")
    mp_policy = mp_policy or MixedPrecisionPolicy()
    if isinstance(student, SelfSharding):
        student.fully_shard(
            mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward
        )
    else:
        # The root's backward follows its forward at once: keeping it gathered saves a gather.
        _shard_layers_and_root(student, mesh, mp_policy, reshard_after_forward, False)
    from torch.distributed.tensor import DTensor

    weightless = next(teacher.parameters(), None) is None  # a cached teacher: nothing to shard
    if not weightless and not any(isinstance(p, DTensor) for p in teacher.parameters()):
        # Frozen: the gathered dtype is the teacher's own. It has no backward, so every unit,
        # the root included, is freed right after its forward.
        _shard_layers_and_root(teacher, mesh, MixedPrecisionPolicy(), True, True)
    left = [n for n, p in teacher.named_parameters() if not isinstance(p, DTensor)]
    if left:
        raise RuntimeError(f"shard_fsdp2: teacher parameters left unsharded: {left[:5]}")


def mixed_precision_policy(precision: str) -> Any:
    """The FSDP2 ``MixedPrecisionPolicy`` for a Lightning precision setting: under
    ``bf16-mixed`` the student's fp32 parameters are gathered in bf16 and gradients reduced in
    fp32; otherwise dtypes are kept."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if str(precision).startswith("bf16-mixed"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


@torch.no_grad()
def gathered_copy(model: nn.Module, into: nn.Module | None = None) -> nn.Module:
    """An unsharded copy of an FSDP2-sharded Hugging Face model, for generation.

    Every rank must call this together (each parameter is all-gathered). ``into``, a copy made
    by an earlier call, is refilled in place instead of building a new model.
    """
    from torch.distributed.tensor import DTensor

    state = {
        k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()
    }
    if into is None:
        from transformers import AutoModelForCausalLM

        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(
                f"cannot generate with a sharded {type(model).__name__}: only Hugging Face models "
                "(with a .config) can be gathered for generation."
            )
        dtype = next(iter(state.values())).dtype
        with torch.device("meta"):
            into = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
        into.load_state_dict(state, assign=True, strict=False)
        if getattr(into.config, "tie_word_embeddings", False):
            into.tie_weights()
        device = next(iter(state.values())).device
        for name, buffer in list(into.named_buffers()):
            if buffer.is_meta:  # non-persistent buffers (rotary inv_freq): take the source's
                source = dict(model.named_buffers())[name]
                module = into.get_submodule(name.rpartition(".")[0])
                module.register_buffer(name.rpartition(".")[2], source.clone(), persistent=False)
        into.to(device)
    else:
        into.load_state_dict(state, strict=False)
    return into.eval()


def close_process_group() -> None:
    """Wait for every rank, then destroy the default process group, if there is one.

    Called at the end of ``lrkd``: a rank that exits and closes its connections while another
    is still finishing can make the other abort at interpreter shutdown (seen once with gloo).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over all ranks: Lightning's ``ModelParallelStrategy`` with a pure
    data-parallel mesh, so that ``devices`` and ``num_nodes`` are all it needs.

    The DistillationModule shards teacher and student in ``configure_model``
    (:func:`shard_fsdp2`). Works on CPU (gloo) and CUDA (NCCL).

    Args:
        data_parallel_size: ranks that shard the model; ``auto`` is all of them
            (``num_nodes * devices``).
        save_distributed_checkpoint: ``True`` saves a folder with one shard per rank (fast, no
            gather; ``lrkd export`` reads it); ``False`` gathers a single full file on rank 0.
        process_group_backend: ``nccl``/``gloo``; ``None`` picks by device.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    def setup_environment(self) -> None:
        """Resolve ``data_parallel_size: auto`` to the world size, then set up the mesh."""
        if model_parallel_sizes(self)[0] == "auto":
            resolve_auto_data_parallel(self, self.num_nodes * self.num_processes)
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        """Load a sharded folder or a full file. A full file holds no teacher weights (the module
        leaves them out of its state_dict), while Lightning's full-file loader checks every
        parameter of the model: so the keys are checked here against the module's state_dict,
        and Lightning loads what is there."""
        from pathlib import Path

        module = self.lightning_module
        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_file() and module is not None and module.strict_loading):
            return super().load_checkpoint(checkpoint_path, weights_only)
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        missing = sorted(module.state_dict().keys() - saved.get("state_dict", {}).keys())
        del saved
        if missing:
            raise KeyError(f"{path}: the checkpoint lacks {len(missing)} keys: {missing[:5]}")
        module.strict_loading = False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            module.strict_loading = True


class LayerWiseFSDPStrategy(FSDPStrategy):
    """FSDP1 (``FullyShardedDataParallel``, CUDA only) with every decoder layer of the teacher and
    the student as its own unit (found with :func:`decoder_layers` at setup) unless
    ``auto_wrap_policy`` is given, and ``use_orig_params`` so that the frozen teacher and the
    trainable student can share the root unit.

    A :class:`~lrkd.models.lowrank.LowRankClone` student needs its teacher layers in the same
    unit as its projections, and generation (paced data, on-policy steps, teacher responses)
    needs gathered copies: use :class:`FSDP2Strategy` for either.

    Args:
        kwargs: passed to Lightning's ``FSDPStrategy`` (``sharding_strategy``,
            ``activation_checkpointing_policy``, ``state_dict_type`` (``full`` or ``sharded``),
            ``cpu_offload``, ...).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)
        super().__init__(**kwargs)

    def setup(self, trainer: Any) -> None:
        """Refuse a Low-Rank Clone student; make every decoder layer of teacher and student a
        unit (unless ``auto_wrap_policy`` was given); then Lightning wraps the model."""
        model = self.lightning_module
        if isinstance(model.student, CoRunStudent):
            raise ValueError(
                "trainer.strategy: LayerWiseFSDPStrategy (FSDP1) cannot pair a LowRankClone's "
                "teacher layers with its projections; use lrkd.distributed.FSDP2Strategy."
            )
        kwargs = fsdp1_kwargs(self)
        if "auto_wrap_policy" not in kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            classes = layer_classes(model.teacher, model.student)
            log.info("lrkd: FSDP units: %s", ", ".join(sorted(c.__name__ for c in classes)))
            kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
        super().setup(trainer)
