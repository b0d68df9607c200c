"""Where the supported dependency range differs in API, the difference lives here and nowhere else.

transformers 5.24 renamed the cache of causal LMs: ``past_key_values`` (attention) and ``cache_params``
(recurrent models) became ``cache`` in model outputs, ``forward`` arguments and what ``generate`` passes.
5.17-5.23 use the old names. The project names its own output field and argument after the installed
release and still accepts the old argument name, as transformers does.
"""

from __future__ import annotations

import dataclasses
import inspect
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
    """One cache from a ``forward`` that accepts the new name and the old one (never both at once)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache once: `cache` or `past_key_values`, not both")
    return cache if cache is not None else past_key_values
