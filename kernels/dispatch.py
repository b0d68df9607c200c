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


# op -> (backend, how it was chosen) of the latest call, for ``defocus-vlm kernels``
LAST_CHOICE: dict[str, tuple[str, str]] = {}


def resolve(op: str, backend: str, backends: dict[str, Callable], auto: Callable[[], str]) -> str:
    """Return the backend name to use for ``op``; raise a clear error for unknown names."""
    how = "argument"
    if backend == "auto":
        backend, how = env_override(op) or "auto", f"{ENV_VAR} environment variable"
    if backend == "auto":
        backend, how = auto(), "automatic (device, dtype, installed packages)"
    if backend not in backends:
        raise ValueError(f"unknown backend {backend!r} for {op}; available: {sorted(backends)}")
    LAST_CHOICE[op] = (backend, how)
    return backend
