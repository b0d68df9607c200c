"""Backend selection shared by every op.

Order of precedence: the explicit ``backend=`` argument, then the ``DEFOCUS_KERNELS``
environment variable (``"reference"`` for every op, or ``"selective_scan=chunked,retention=recurrent"``),
then the op's own automatic rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable

ENV_VAR = "DEFOCUS_KERNELS"


def env_override(op: str) -> str | None:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    for item in raw.split(","):
        item = item.strip()
        if "=" in item:
            name, value = (s.strip() for s in item.split("=", 1))
            if name == op:
                return value
        elif item:
            return item
    return None


def resolve(op: str, backend: str, backends: dict[str, Callable], auto: Callable[[], str]) -> str:
    """Return the backend name to use for ``op``; raise a clear error for unknown names."""
    if backend == "auto":
        backend = env_override(op) or "auto"
    if backend == "auto":
        backend = auto()
    if backend not in backends:
        raise ValueError(f"unknown backend {backend!r} for {op}; available: {sorted(backends)}")
    return backend
