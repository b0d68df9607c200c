"""What optional kernel packages are usable here."""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache

import torch


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


# backend -> the module it needs: what the automatic rules, the benchmarks and the GPU check test
BACKEND_MODULES = {
    "mamba_ssm": "mamba_ssm.ops.selective_scan_interface", "causal_conv1d": "causal_conv1d",
    "fla": "fla.ops.simple_gla", "triton": "triton", "flex": "torch.nn.attention.flex_attention",
}


def backend_importable(backend: str) -> bool:
    """The package a GPU backend needs imports here (True for backends that need none)."""
    return backend not in BACKEND_MODULES or importable(BACKEND_MODULES[backend])


def usable(op: str, backend: str, device: torch.device) -> bool:
    """Whether ``backend`` of ``op`` can run on ``device`` here (aliases of the reference excluded:
    they would only time it twice)."""
    if backend == "fused":  # the C++ CPU ops, when they build here
        from .cpu_extension import fused_available

        return device.type == "cpu" and fused_available()
    if backend in BACKEND_MODULES:
        return device.type == "cuda" and backend_importable(backend)
    return backend != "torch" or op != "causal_conv1d"  # "torch" is an alias of the reference there
