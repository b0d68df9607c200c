"""Backend selection shared by every op: one :class:`KernelOp` per op.

Order of precedence: the explicit ``backend=`` argument, then the ``DEFOCUS_KERNELS``
environment variable (``"reference"`` for every op, ``"selective_scan=chunked,retention=recurrent"``, or
both: ``"reference,retention=recurrent"``, where an op's own entry wins), then the op's automatic rule.

The automatic rule is a function of a few hashable facts about the inputs (device type, whether a
decay is given, a shape class), so its answer is cached per (op, facts) in a bounded LRU cache that
the op owns. Nothing is written per call: code that wants to see the choices (``defocus-vlm kernels``,
tests) asks for them with :func:`record_choices`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

ENV_VAR = "DEFOCUS_KERNELS"
BY_ARGUMENT = "argument"
BY_ENV = f"{ENV_VAR} environment variable"
BY_RULE = "automatic (device, input shape, installed packages)"

# op -> (backend, how it was chosen); set only inside record_choices(), None otherwise
_RECORDING: contextvars.ContextVar[dict[str, tuple[str, str]] | None] = contextvars.ContextVar(
    "defocus_kernel_choices", default=None)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype every op computes in for ``t``: float64 for float64, float32 otherwise (half inputs upcast)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=8)
def _parse_env(raw: str) -> tuple[str | None, dict[str, str]]:
    """(value for every op, {op: value}) of a ``DEFOCUS_KERNELS`` string."""
    every, per_op = None, {}
    for item in (s.strip() for s in raw.split(",")):
        if "=" in item:
            name, value = (s.strip() for s in item.split("=", 1))
            per_op.setdefault(name, value)
        elif item and every is None:
            every = item
    return every, per_op


def env_override(op: str) -> str | None:
    """The backend ``DEFOCUS_KERNELS`` names for ``op``, or None."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    every, per_op = _parse_env(raw)
    return per_op.get(op, every)


class KernelOp:
    """One op's backends and its automatic rule.

    ``facts(*inputs)`` reduces the op's inputs to a small hashable tuple (what the rule looks at);
    ``rule(*facts)`` names a backend; ``op.rule`` is that function behind an LRU cache of ``cache_size``
    entries (``op.rule.cache_clear()`` forgets the answers, e.g. after a test changed what they depend on).
    """

    def __init__(self, name: str, backends: dict[str, Callable], facts: Callable[..., tuple],
                 rule: Callable[..., str], cache_size: int = 64) -> None:
        self.name = name
        self.backends = backends
        self.facts = facts
        self._rule = rule
        self.rule = functools.lru_cache(maxsize=cache_size)(rule)

    def auto(self, *inputs: Any) -> str:
        """The backend the automatic rule picks for these inputs (ignoring ``DEFOCUS_KERNELS``)."""
        if torch.compiler.is_compiling():  # dynamo traces through an LRU cache anyway (and warns about it)
            return self._rule(*self.facts(*inputs))
        return self.rule(*self.facts(*inputs))

    def choose(self, backend: str, *inputs: Any) -> str:
        """The backend to run: ``backend`` unless it is ``"auto"`` (then the environment variable, then
        the automatic rule); an unknown name is a ValueError listing the available ones."""
        how = BY_ARGUMENT
        if backend == "auto":
            backend, how = env_override(self.name) or "auto", BY_ENV
        if backend == "auto":
            backend, how = self.auto(*inputs), BY_RULE
        if backend not in self.backends:
            raise ValueError(f"unknown backend {backend!r} for {self.name}; available: {sorted(self.backends)}")
        log = _RECORDING.get()
        if log is not None:
            log[self.name] = (backend, how)
        return backend


@contextlib.contextmanager
def record_choices() -> Iterator[dict[str, tuple[str, str]]]:
    """Within the block, every op records ``op -> (backend, how it was chosen)`` of its latest call
    into the yielded dict (a nested block records into its own)."""
    choices: dict[str, tuple[str, str]] = {}
    token = _RECORDING.set(choices)
    try:
        yield choices
    finally:
        _RECORDING.reset(token)
