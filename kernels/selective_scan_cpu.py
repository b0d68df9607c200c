"""Fused CPU selective scan: a C++ op (``csrc/selective_scan_cpu.cpp``) built just in time.

One pass over the sequence, forward and backward, with the state in L1; the (batch, channel
block) work items run on torch's OpenMP threads (``torch.get_num_threads()``), and results do not
depend on the thread count. Exact: float64 agrees with the recurrence to rounding (the tests).

The build runs once per machine and source version (about 15 s with one core) through
``torch.utils.cpp_extension.load``, which caches it under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); it needs a C++ compiler and ninja. The extension name carries the
CPU capability torch detected (``torch.backends.cpu.get_cpu_capability()``, e.g. AVX512), so a
cache shared between different machines never loads code built for instructions this one lacks.
If the build fails, :func:`fused_available` is False, one warning says why, and the automatic
rule keeps the recurrence (``selective_scan._reference``).
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .selective_scan import check_scan_shapes

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
# Steps per checkpoint: the backward keeps a tile's states and decays for a block of 64 float32
# channels (about 270 KB at N = 16: L2) and the forward stores N / TILE times u's size of
# checkpoints. 16 is as fast, 64 slower (benchmarks/README.md).
DEFAULT_TILE = 32

_ISA_FLAGS = {  # torch's CPU capability -> compiler flags (x86; other CPUs get the compiler's default)
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma",
               "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older or exotic builds: no ISA-specific flags
        return "DEFAULT"


NAMESPACE = "defocus_scan_cpu"  # torch.ops namespace of the default build
PORTABLE_NAMESPACE = "defocus_scan_cpu_portable"  # the build without ISA-specific code (tests)


def build_options(portable: bool = False) -> dict:
    """Arguments for ``torch.utils.cpp_extension.load``. The name encodes the CPU capability;
    ``portable`` builds the generic-vector code path only (what CPUs without AVX-512 run), under
    its own name and op namespace so that both can be loaded in one process."""
    cap = _capability()
    # -Wno-psabi: 64-byte vectors passed between inline functions on CPUs without AVX-512 (internal)
    flags = ["-O3", "-fopenmp", "-Wno-psabi", *(_ISA_FLAGS.get(cap, []) if _is_x86() else [])]
    name = f"defocus_selective_scan_cpu_{cap.lower()}"
    if portable:
        flags += ["-DDEFOCUS_SCAN_GENERIC", f"-DDEFOCUS_SCAN_NAMESPACE={PORTABLE_NAMESPACE}"]
        name += "_portable"
    return dict(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                is_python_module=False, verbose=False)


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def _namespace(portable: bool) -> str:
    return PORTABLE_NAMESPACE if portable else NAMESPACE


def _registered(portable: bool) -> bool:
    return hasattr(getattr(torch.ops, _namespace(portable)), "fwd")


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
    logger.info("loading the fused CPU selective scan (built once, cached under %s)", where)
    load(**build_options(portable))
    if not _registered(portable):
        raise RuntimeError("the extension loaded but did not register its ops")


@cache
def load_error(portable: bool = False) -> str | None:
    """None when the fused op is usable, else why not (logged once as a warning)."""
    try:
        _load(portable)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: keep the recurrence
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
        logger.warning("fused CPU selective scan unavailable (%s); using the reference recurrence", reason)
        return reason
    return None


def fused_available() -> bool:
    """Whether the fused CPU op is built and loaded (builds it on the first call)."""
    return load_error() is None


def ops(portable: bool = False):
    """The op namespace (``fwd``, ``bwd``, ``variant``) of a loaded build."""
    return getattr(torch.ops, _namespace(portable))


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, h0, tile, op):  # noqa: D102 - see fused_selective_scan
        save = any(ctx.needs_input_grad[:8])
        ctx.set_materialize_grads(False)  # an unused last state gets no zero gradient tensor
        y, last, ckpt = op.fwd(u, delta, A, B, C, D, z, h0, tile, save)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, h0, ckpt)
            ctx.tile, ctx.op = tile, op
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dlast):  # noqa: D102
        u, delta, A, B, C, D, z, h0, ckpt = ctx.saved_tensors
        dy = torch.zeros_like(u) if dy is None else dy
        dlast = None if dlast is None else dlast.contiguous()
        du, ddelta, dA, dB, dC, dD, dz, dh0 = ctx.op.bwd(u, delta, A, B, C, D, z, h0, ckpt, dy, dlast, ctx.tile)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                dh0 if h0 is not None else None, None, None)


def fused_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, initial_state: Tensor | None = None, *, tile: int = DEFAULT_TILE,
                         portable: bool = False) -> tuple[Tensor, Tensor]:
    """The fused scan on CPU: y (B, D, L) and the last state (B, D, N), both in the compute dtype
    (float64 for float64 u, float32 otherwise; half inputs are upcast, as the reference does).
    Differentiable in every tensor argument (first order). Raises when the op is unavailable.
    ``portable`` runs the generic-vector build instead of the ISA-specific one (for tests)."""
    error = load_error(portable)
    if error is not None:
        raise RuntimeError(f"the fused CPU selective scan is unavailable here: {error}")
    check_scan_shapes(u, delta, A, B, C, D, z, initial_state)
    tensors = [t for t in (u, delta, A, B, C, D, z, initial_state) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the 'fused' selective-scan backend runs on CPU tensors only")
    dt = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, B, C = (t.to(dt) for t in (u, delta, B, C))  # any strides: the kernel reads them as they are
    A = A.to(dt).contiguous()
    D = None if D is None else D.to(dt).contiguous()
    z = None if z is None else z.to(dt)
    h0 = None if initial_state is None else initial_state.to(dt).contiguous()
    batch, dim, length = u.shape
    if length == 0:  # nothing to scan: y is empty and the state passes through
        last = h0 if h0 is not None else u.new_zeros(batch, dim, A.shape[1])
        return u.new_zeros(u.shape), last
    return _FusedScan.apply(u, delta, A, B, C, D, z, h0, tile, ops(portable))
