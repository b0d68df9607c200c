"""The C++ CPU ops (``csrc/``), built just in time as one extension: the fused selective scan
(``selective_scan_cpu``) and the Mamba mixer's fused element-wise parts (``causal_conv1d``'s and
``gated_norm``'s ``fused`` backends).

The build runs once per machine and source version (about 30 s with one core) through
``torch.utils.cpp_extension.load``, which caches it under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); it needs a C++ compiler and ninja. The extension's name carries a
digest of the sources (headers included, which torch's own check does not cover) and the CPU
capability torch detected (``torch.backends.cpu.get_cpu_capability()``, e.g. AVX512), so a cache
shared between machines never loads code built for instructions this one lacks. If the build
fails, :func:`fused_available` is False, one warning says why, and the automatic rules keep the
PyTorch references.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "selective_scan_cpu.cpp", CSRC / "mamba_elementwise_cpu.cpp")
HEADERS = (CSRC / "simd.h",)
# every op the extension registers: a build that lacks one (an older cached build) is not used
OP_NAMES = ("scan_fwd", "scan_bwd", "variant", "conv_fwd", "conv_bwd", "gate_fwd", "gate_bwd")

_ISA_FLAGS = {  # torch's CPU capability -> compiler flags (x86; other CPUs get the compiler's default)
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma",
               "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}

NAMESPACE = "defocus_cpu"  # torch.ops namespace of the default build
PORTABLE_NAMESPACE = "defocus_cpu_portable"  # the build without ISA-specific code (tests)


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older or exotic builds: no ISA-specific flags
        return "DEFAULT"


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


@cache
def source_digest() -> str:
    """8 hex digits of the sources and headers: a changed header is a new build."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def build_options(portable: bool = False) -> dict:
    """Arguments for ``torch.utils.cpp_extension.load``. The name ends with the CPU capability;
    ``portable`` builds the generic-vector code path only (what CPUs without AVX-512 run), under
    its own name and op namespace so that both can be loaded in one process."""
    cap = _capability()
    # -Wno-psabi: 64-byte vectors passed between inline functions on CPUs without AVX-512 (internal)
    flags = ["-O3", "-fopenmp", "-Wno-psabi", *(_ISA_FLAGS.get(cap, []) if _is_x86() else [])]
    name = f"defocus_cpu_ops_{source_digest()}_{cap.lower()}"
    if portable:
        flags += ["-DDEFOCUS_CPU_GENERIC", f"-DDEFOCUS_CPU_NAMESPACE={PORTABLE_NAMESPACE}"]
        name += "_portable"
    return dict(name=name, sources=[str(s) for s in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                is_python_module=False, verbose=False)


def _namespace(portable: bool) -> str:
    return PORTABLE_NAMESPACE if portable else NAMESPACE


def _registered(portable: bool) -> bool:
    namespace = getattr(torch.ops, _namespace(portable))
    return all(hasattr(namespace, name) for name in OP_NAMES)


def _load(portable: bool = False) -> None:
    """Build (or load the cached build of) the extension; raises on any failure."""
    if _registered(portable):
        return  # already loaded in this process
    # importing cpp_extension logs a CUDA_HOME notice on CPU-only torch builds: not ours to show
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        quiet.setLevel(level)
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    logger.info("loading the fused CPU ops (built once, cached under %s)", where)
    load(**build_options(portable))
    if not _registered(portable):
        raise RuntimeError("the extension loaded but did not register its ops")


@cache
def load_error(portable: bool = False) -> str | None:
    """None when the fused ops are usable, else why not (logged once as a warning)."""
    try:
        _load(portable)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: keep the references
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
        logger.warning("fused CPU ops unavailable (%s); using the PyTorch references", reason)
        return reason
    return None


def fused_available() -> bool:
    """Whether the fused CPU ops are built and loaded (builds them on the first call)."""
    return load_error() is None


def ops(portable: bool = False) -> torch._ops._OpNamespace:
    """The op namespace of a loaded build (``scan_fwd``, ``conv_fwd``, ``gate_fwd``, ...)."""
    return getattr(torch.ops, _namespace(portable))


def require(what: str, portable: bool = False) -> torch._ops._OpNamespace:
    """``ops(portable)``, or a RuntimeError naming ``what`` and why the build is unusable here."""
    error = load_error(portable)
    if error is not None:
        raise RuntimeError(f"the fused CPU {what} is unavailable here: {error}")
    return ops(portable)


def is_tracing() -> bool:
    """Inside torch.export / torch.compile: they trace with fake tensors, which the JIT-built ops
    have no shape rules for, so traced code takes the PyTorch references (which they can follow)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.x exposes it; older: never
    return torch.compiler.is_compiling() or bool(is_exporting and is_exporting())


def device_facts(device: torch.device | str) -> tuple[str, bool]:
    """What the CPU ops' automatic rules look at: the device type and whether code is being traced."""
    return torch.device(device).type, is_tracing()


def fused_rule(device_type: str, tracing: bool) -> bool:
    """Whether an automatic rule takes the fused CPU op: CPU tensors, not traced, the build usable."""
    return device_type == "cpu" and not tracing and fused_available()
