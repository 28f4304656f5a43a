"""Every private or version-sensitive call lrkd makes into transformers, Lightning and torch.

The rest of lrkd goes through the functions here, never through a private name of those
libraries, so that an upstream change breaks one function with one test
(``tests/unit/test_compat.py``) rather than the quickstart. Each entry names the versions it
was checked against and what it does when the library no longer offers what it uses: adapt
(read the current signature), fall back (a public route, documented), or fail with a message
that names the package and its version.

Supported ranges (``pyproject.toml``; ``constraints.txt`` is the exact set last verified, and
``.ci/run`` tests the lower bounds and the newest releases too): torch >= 2.11, transformers
>= 5.17, lightning >= 2.6, jsonargparse >= 4.39.

lm-evaluation-harness (the optional ``eval`` extra, >= 0.4.13) is called from one module only,
:mod:`lrkd.evaluation.harness`, through its public API (``simple_evaluate``, ``TaskManager``,
``HFLM``); its logger names there are the one version-sensitive detail (a rename only makes
lm-eval chattier).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# transformers


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - always installed
        return "not installed"


class UnsupportedVersionError(RuntimeError):
    """A library's internals changed in a way this lrkd does not know; the message names the
    package, its version, what changed and what to do."""


def _unsupported(package: str, what: str) -> UnsupportedVersionError:
    return UnsupportedVersionError(
        f"{package} {_version(package)}: {what}. lrkd {_lrkd_version()} supports the ranges in "
        "its pyproject.toml and was last verified with constraints.txt; install those "
        f"(pip install -c constraints.txt -e .) or report this with `lrkd env`."
    )


def _lrkd_version() -> str:
    from lrkd import __version__

    return __version__


def _parameters(fn: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """``fn``'s named parameters (following ``functools.wraps`` decorators) and whether it
    takes ``**kwargs``; a bound method is looked up by its function (cached per class, not per
    object)."""
    return _function_parameters(getattr(fn, "__func__", fn))


@functools.cache
def _function_parameters(fn: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    params = dict(inspect.signature(fn).parameters)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {
        name: p
        for name, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        and name != "self"
    }
    return params, var_kw


def _cache_keyword(fn: Callable[..., Any]) -> str | None:
    """The name under which ``fn`` takes a KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (5.17-5.23); ``None`` if it names neither."""
    params, _ = _parameters(fn)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def attention_implementation(config: Any) -> str:
    """The attention implementation a loaded model runs with (``sdpa``, ``eager``, ...).

    Reads ``config._attn_implementation`` (transformers 5.17-5.24, no public getter); falls
    back to ``sdpa`` when the attribute is missing or unset.
    """
    return getattr(config, "_attn_implementation", None) or "sdpa"


#: Config attributes that describe where a model came from, not what it is: dropped when a
#: student's config is derived from a teacher's (``_name_or_path`` is transformers' own field
#: behind the public ``name_or_path``; ``_model_name_or_path`` is what a GGUF file's
#: ``general.name`` becomes in ``to_dict()``, 5.17-5.24).
_PROVENANCE_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def derived_config(config: Any) -> Any:
    """A deep copy of a transformers config without the teacher's provenance (its
    ``quantization_config`` and ``name_or_path``), to build a new model from.

    Checked on transformers 5.17-5.24; a key a version does not have is skipped.
    """
    config = copy.deepcopy(config)
    for key in _PROVENANCE_KEYS:
        if key in vars(config):
            delattr(config, key)
    return config


def drop_provenance(config_dict: dict[str, Any]) -> dict[str, Any]:
    """``config_dict`` (a ``config.to_dict()``) without the provenance keys of
    :func:`derived_config`."""
    return {k: v for k, v in config_dict.items() if k not in _PROVENANCE_KEYS}


def causal_mask(
    kind: str,
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
) -> Any:
    """The attention mask a decoder layer of ``config``'s family expects, made by transformers'
    own ``masking_utils`` function for ``kind`` (``full_attention`` or ``sliding_attention``),
    for a forward without a KV cache.

    The mask functions are not public API and their signature moves: 5.17-5.23 take
    ``past_key_values``, 5.24 renamed it ``cache`` (and made it required), older ones also took
    ``cache_position``. The call is built from the current signature: the cache goes under
    whichever name the function has, and a required parameter this function does not know
    raises :class:`UnsupportedVersionError` naming the transformers version.
    """
    try:
        from transformers import masking_utils
    except ImportError as err:  # pragma: no cover - present in every supported version
        raise _unsupported("transformers", "transformers.masking_utils is gone") from err
    name = (
        "create_sliding_window_causal_mask" if kind == "sliding_attention" else "create_causal_mask"
    )
    fn = getattr(masking_utils, name, None)
    if fn is None:
        raise _unsupported("transformers", f"masking_utils.{name} is gone")
    offered = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "input_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "cache": None,
        "past_key_values": None,
        "position_ids": position_ids,
        "cache_position": torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device),
    }
    params, _ = _parameters(fn)
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    unknown = [n for n in required if n not in offered]
    if unknown:
        raise _unsupported(
            "transformers", f"masking_utils.{name} now requires {unknown}, which lrkd does not pass"
        )
    return fn(**{k: v for k, v in offered.items() if k in params})


def call_decoder_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    attention_mask: Any,
    position_embeddings: Any,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Run one transformers decoder layer without a KV cache and return its hidden states.

    The call convention moves: 5.17-5.23 name the cache ``past_key_values``, 5.24 ``cache``;
    older versions returned a tuple. Only the parameters the layer names are passed (nothing
    unknown through ``**kwargs``, where it would reach the attention function).
    """
    params, _ = _parameters(layer.forward)
    offered: dict[str, Any] = {
        "attention_mask": attention_mask,
        "position_embeddings": position_embeddings,
        "position_ids": position_ids,
        "use_cache": False,
    }
    cache = _cache_keyword(layer.forward)
    if cache is not None:
        offered[cache] = None
    out = layer(hidden, **{k: v for k, v in offered.items() if k in params})
    return out[0] if isinstance(out, tuple) else out


def supports_kv_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes a KV cache and ``use_cache`` (any transformers causal LM
    of 5.17-5.24; a custom student usually not)."""
    try:
        params, _ = _parameters(model.forward)
    except (TypeError, ValueError):
        return False
    return _cache_keyword(model.forward) is not None and "use_cache" in params


def forward_with_kv_cache(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any,
) -> tuple[torch.Tensor, Any]:
    """One decoding step of a transformers causal LM: ``(logits, new cache)``.

    The cache argument and the output field are ``past_key_values`` on 5.17-5.23 and ``cache``
    on 5.24 (where ``past_key_values`` is a deprecated alias); both are read from the model's
    signature and output.
    """
    keyword = _cache_keyword(model.forward)
    if keyword is None:
        raise _unsupported(
            "transformers", f"{type(model).__name__}.forward takes no KV cache argument"
        )
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{keyword: cache},
    )
    for field in ("cache", "past_key_values"):
        new = getattr(out, field, None)
        if new is not None:
            return out.logits, new
    raise _unsupported("transformers", f"{type(out).__name__} carries no KV cache")


def no_split_module_names(model: nn.Module) -> set[str]:
    """The class names of a transformers model's decoder layers (``_no_split_modules``, the
    units ``accelerate`` never splits; 5.17-5.24). Empty for any other module."""
    return set(getattr(model, "_no_split_modules", None) or ())


# --------------------------------------------------------------------------------------------
# Lightning


def attached_trainer(module: Any) -> Any:
    """The Trainer ``module`` (a LightningModule) is attached to, or ``None``.

    The public ``LightningModule.trainer`` raises when there is none (2.6); this reads the
    attribute behind it (``_trainer``, 2.6.0-2.6.6).
    """
    return getattr(module, "_trainer", None)


def instantiated_by_cli() -> bool:
    """Whether LightningCLI is instantiating a module from a config right now (then Lightning
    saves the config itself, and ``save_hyperparameters`` must not drop the objects).

    Reads Lightning's ``_given_hyperparameters`` context variable (2.3-2.6.6); without it,
    returns ``False`` (objects are then left out of the saved hyperparameters).
    """
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:
        return False
    return _given_hyperparameters.get() is not None


def epoch_batches_done(trainer: Any) -> int:
    """Micro-batches of the current training epoch the Trainer has fetched so far (restored
    from a checkpoint when resuming): ``fit_loop.epoch_loop.batch_progress.current.ready``
    (Lightning 2.0-2.6.6); ``0`` without a fit loop."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if loop is None:
        return 0
    progress = getattr(loop, "batch_progress", None)
    if progress is None:
        raise _unsupported("lightning", "fit_loop.epoch_loop.batch_progress is gone")
    return int(progress.current.ready)


def model_parallel_sizes(strategy: Any) -> tuple[Any, Any]:
    """``(data_parallel_size, tensor_parallel_size)`` of a ``ModelParallelStrategy`` as
    configured (``"auto"`` until its environment is set up); Lightning 2.4-2.6.6 keep them in
    ``_data_parallel_size`` / ``_tensor_parallel_size`` with no public getter."""
    return strategy._data_parallel_size, strategy._tensor_parallel_size


def resolve_auto_data_parallel(strategy: Any, size: int) -> None:
    """Resolve a ``ModelParallelStrategy``'s data-parallel size before its mesh is built
    (Lightning's own ``auto`` means ``num_nodes``, which leaves the ranks of one node to tensor
    parallelism). 2.4-2.6.6."""
    strategy._data_parallel_size = size


def fsdp1_kwargs(strategy: Any) -> dict[str, Any]:
    """The keyword arguments Lightning's ``FSDPStrategy`` passes to
    ``FullyShardedDataParallel`` (``strategy.kwargs``, 2.0-2.6.6), to be filled in before its
    ``setup`` wraps the model."""
    kwargs = getattr(strategy, "kwargs", None)
    if not isinstance(kwargs, dict):
        raise _unsupported("lightning", "FSDPStrategy.kwargs is gone")
    return kwargs


# --------------------------------------------------------------------------------------------
# torch


def tensor_version(tensor: torch.Tensor) -> int:
    """The in-place modification counter of ``tensor`` (``Tensor._version``, torch 2.4-2.13): it
    changes whenever an optimizer updates a parameter, so it keys a cache of values derived
    from the parameter."""
    return tensor._version
