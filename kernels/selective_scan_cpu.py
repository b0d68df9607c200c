"""Fused CPU selective scan: a C++ op (``csrc/selective_scan_cpu.cpp``, built by ``cpu_extension``).

One pass over the sequence, forward and backward, with the state in L1; the (batch, channel
block) work items run on torch's OpenMP threads (``torch.get_num_threads()``), and results do not
depend on the thread count. Exact: float64 agrees with the recurrence to rounding (the tests).
Where the extension cannot be built, the automatic rule keeps the recurrence
(``selective_scan._reference``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu_extension import require
from .dispatch import compute_dtype
from .selective_scan import check_scan_shapes

# Steps per checkpoint: the backward keeps a tile's states and decays for a block of 64 float32
# channels (about 270 KB at N = 16: L2) and the forward stores N / TILE times u's size of
# checkpoints. 16 is as fast, 64 slower (benchmarks/README.md).
DEFAULT_TILE = 32


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, h0, tile, op, softplus):  # noqa: D102 - see fused_selective_scan
        save = any(ctx.needs_input_grad[:8])
        ctx.set_materialize_grads(False)  # an unused last state gets no zero gradient tensor
        y, last, ckpt = op.scan_fwd(u, delta, A, B, C, D, z, h0, tile, save, softplus)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, h0, ckpt)
            ctx.tile, ctx.op, ctx.softplus = tile, op, softplus
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dlast):  # noqa: D102
        u, delta, A, B, C, D, z, h0, ckpt = ctx.saved_tensors
        dy = torch.zeros_like(u) if dy is None else dy
        dlast = None if dlast is None else dlast.contiguous()
        du, ddelta, dA, dB, dC, dD, dz, dh0 = ctx.op.scan_bwd(u, delta, A, B, C, D, z, h0, ckpt, dy, dlast, ctx.tile,
                                                              ctx.softplus)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                dh0 if h0 is not None else None, None, None, None)


def fused_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, initial_state: Tensor | None = None, *, delta_softplus: bool = False,
                         tile: int = DEFAULT_TILE, portable: bool = False) -> tuple[Tensor, Tensor]:
    """The fused scan on CPU: y (B, D, L) and the last state (B, D, N), both in the compute dtype
    (float64 for float64 u, float32 otherwise; half inputs are upcast, as the reference does).
    Differentiable in every tensor argument (first order). Raises when the op is unavailable.
    ``delta_softplus``: the scan uses softplus(delta), computed in the kernel (torch's softplus, threshold
    20). ``portable`` runs the generic-vector build instead of the ISA-specific one (for tests)."""
    op = require("selective scan", portable)
    check_scan_shapes(u, delta, A, B, C, D, z, initial_state)
    tensors = [t for t in (u, delta, A, B, C, D, z, initial_state) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("the 'fused' selective-scan backend runs on CPU tensors only")
    dt = compute_dtype(u)
    u, delta, B, C = (t.to(dt) for t in (u, delta, B, C))  # any strides: the kernel reads them as they are
    A = A.to(dt).contiguous()
    D = None if D is None else D.to(dt).contiguous()
    z = None if z is None else z.to(dt)
    h0 = None if initial_state is None else initial_state.to(dt).contiguous()
    batch, dim, length = u.shape
    if length == 0:  # nothing to scan: y is empty and the state passes through
        last = h0 if h0 is not None else u.new_zeros(batch, dim, A.shape[1])
        return u.new_zeros(u.shape), last
    return _FusedScan.apply(u, delta, A, B, C, D, z, h0, tile, op, delta_softplus)
