"""What optional kernel packages are usable here."""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache


@cache
def has_module(name: str) -> bool:
    """Installed (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@cache
def importable(name: str) -> bool:
    """Actually imports: mamba-ssm, for one, installs without its CUDA extension."""
    if not has_module(name.split(".")[0]):
        return False
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True
