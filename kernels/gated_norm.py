"""The Mamba mixer's output gate (De-focus Mamba): RMS norm without weight over consecutive channel
groups of the scan's output, plus the skip D * u, times SiLU(z).

    out = (rms_norm_per_group(y) + D * u) * silu(z)        y, u, z: (B, E, L); D: (E,)

Computed in float32 (float64 for float64 inputs) and rounded once to y's dtype.

Backends
- ``reference``: PyTorch (the source of truth).
- ``fused``: one C++ pass forward and one backward (``csrc/mamba_elementwise_cpu.cpp``); CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .cpu_extension import device_facts, fused_rule, require
from .dispatch import KernelOp, compute_dtype

EPS = 1e-6


def _reference(y, u, z, D, group_size, eps):
    ct = compute_dtype(y)
    g = y.to(ct).unflatten(1, (-1, group_size))  # RMS norm without weight over each channel group
    normed = (g * torch.rsqrt(g.pow(2).mean(2, keepdim=True) + eps)).flatten(1, 2)
    return ((normed + D[:, None].to(ct) * u.to(ct)) * F.silu(z.to(ct))).to(y.dtype)


class _FusedGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, u, z, D, group_size, eps, op):  # noqa: D102 - see gated_group_rms_norm
        d_compute = D.to(compute_dtype(y)).contiguous()
        out, rstd = op.gate_fwd(y, u, z, d_compute, group_size, eps)
        ctx.save_for_backward(y, u, z, d_compute, rstd)
        ctx.args, ctx.d_dtype = (group_size, eps, op), D.dtype
        return out.transpose(1, 2)  # (B, L, E) storage: what the output projection reads

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):  # noqa: D102
        y, u, z, d_compute, rstd = ctx.saved_tensors
        group_size, eps, op = ctx.args
        dy, du, dz, dD = op.gate_bwd(y, u, z, d_compute, rstd, dout, group_size, eps)
        return dy.transpose(1, 2), du.transpose(1, 2), dz.transpose(1, 2), dD.to(ctx.d_dtype), None, None, None


def _fused(y, u, z, D, group_size, eps):  # CPU, C++ built just in time
    op = require("gated norm")
    return _FusedGate.apply(y, u.to(y.dtype), z.to(y.dtype), D, group_size, eps, op)


BACKENDS = {"reference": _reference, "fused": _fused}


def _auto_rule(device_type: str, tracing: bool) -> str:
    # the fused op on CPU (2 passes instead of ~12 ATen kernels with dtype round trips;
    # benchmarks/cpu_mamba_elementwise.json); traced code takes the reference (cpu_extension.is_tracing)
    return "fused" if fused_rule(device_type, tracing) else "reference"


OP = KernelOp("gated_norm", BACKENDS, facts=lambda y: device_facts(y.device), rule=_auto_rule)


def gated_group_rms_norm(y: torch.Tensor, u: torch.Tensor, z: torch.Tensor, D: torch.Tensor, group_size: int,
                         eps: float = EPS, backend: str = "auto") -> torch.Tensor:
    """(rms_norm_per_group(y) + D u) silu(z) for y, u, z (B, E, L) and D (E,); y's dtype out."""
    if y.dim() != 3 or u.shape != y.shape or z.shape != y.shape or D.shape != (y.shape[1],):
        raise ValueError(f"expected y, u, z (B, E, L) and D (E,), got {tuple(y.shape)}, {tuple(u.shape)}, "
                         f"{tuple(z.shape)}, {tuple(D.shape)}")
    if group_size <= 0 or y.shape[1] % group_size:
        raise ValueError(f"the group size must divide the channels ({y.shape[1]}), got {group_size}")
    name = OP.choose(backend, y)
    return BACKENDS[name](y, u, z, D, group_size, eps)
