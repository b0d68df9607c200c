"""Where the supported dependency range differs in API, the difference lives here and nowhere else.

transformers 5.24 renamed the cache of causal LMs: ``past_key_values`` (attention) and ``cache_params``
(recurrent models) became ``cache`` in model outputs, ``forward`` arguments and what ``generate`` passes.
5.17-5.23 use the old names. The project names its own output field and argument after the installed
release and still accepts the old argument name, as transformers does.

transformers 5.24 also renamed gradient checkpointing to activation checkpointing: the model methods
(``gradient_checkpointing_enable`` / ``_disable`` / ``is_gradient_checkpointing`` still exist there, deprecated)
and the ``TrainingArguments`` fields (``gradient_checkpointing[_kwargs]``).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

# The name of the cache field in model outputs (and of the argument ``generate`` passes to ``forward``).
CACHE_NAME: str = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values", "cache_params")


def cache_argument(forward: Callable) -> str:
    """The name under which a language model's ``forward`` takes its cache."""
    parameters = inspect.signature(forward).parameters
    for name in _CACHE_NAMES:
        if name in parameters:
            return name
    raise TypeError(f"{getattr(forward, '__qualname__', forward)} takes no cache argument (none of {_CACHE_NAMES})")


def cache_of(output: Any) -> Any:
    """The cache a model output carries, whichever name its release gives it (None when it has none)."""
    for name in _CACHE_NAMES:
        if name in output.keys() and output[name] is not None:
            return output[name]
    return None


def merge_cache_arguments(cache: Any, past_key_values: Any) -> Any:
    """One cache from a ``forward`` that accepts the new name and the old one (never both at once). Where the
    installed release has renamed it, the old name warns as transformers' own models do."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache once: `cache` or `past_key_values`, not both")
    if past_key_values is not None and CACHE_NAME == "cache":
        warnings.warn("`past_key_values` is deprecated, use `cache` instead", FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


def enable_activation_checkpointing(model: Any, checkpoint_kwargs: dict | None = None, every_n_layers: int = 1,
                                    offload: bool = False) -> None:
    """``activation_checkpointing_enable`` (5.24) or ``gradient_checkpointing_enable`` (before), same arguments:
    ``checkpoint_kwargs`` for ``torch.utils.checkpoint``, every ``every_n_layers``-th layer, ``offload`` to the host."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(checkpoint_kwargs, every_n_layers=every_n_layers, offload=offload)


def disable_activation_checkpointing(model: Any) -> None:
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


def activation_checkpointing_active(model: Any) -> bool:
    """``is_activation_checkpointing`` (5.24) or ``is_gradient_checkpointing`` (before)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name))


def checkpointing_training_arguments(checkpoint_kwargs: dict | None = None) -> dict:
    """``TrainingArguments`` keywords that turn activation checkpointing on, under the installed release's names;
    ``checkpoint_kwargs`` may hold ``every_n_layers`` and ``offload`` besides ``torch.utils.checkpoint``'s."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {prefix: True, f"{prefix}_kwargs": checkpoint_kwargs}
