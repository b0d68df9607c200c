"""Depthwise causal 1D convolution with a carried state (the last K-1 inputs).

Backends
- ``reference`` (alias ``torch``): ``F.conv1d`` on the state-padded input, in the input dtype.
- ``fused``: one C++ pass forward and one backward, computed in float32 (float64 for float64) and
  rounded once (``csrc/mamba_elementwise_cpu.cpp``); CPU.
- ``causal_conv1d``: the causal-conv1d package's CUDA kernel when it is importable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .cpu_extension import device_facts, fused_rule, require
from .dispatch import KernelOp, compute_dtype


def _reference(x, weight, bias, state, activation):
    width = weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], width - 1)
    padded = torch.cat([state.to(x.dtype), x], dim=-1)
    y = F.conv1d(padded, weight.unsqueeze(1), bias, groups=x.shape[1])
    new_state = padded[..., padded.shape[-1] - (width - 1):]
    if activation == "silu":
        y = F.silu(y)
    return y, new_state


def _external(x, weight, bias, state, activation):  # pragma: no cover - needs CUDA + causal-conv1d
    from causal_conv1d import causal_conv1d_fn

    if state is not None:
        return _reference(x, weight, bias, state, activation)
    y = causal_conv1d_fn(x, weight, bias, activation=activation)
    return y, _last_inputs(x, None, weight.shape[-1])


def _last_inputs(x, state, width):
    """The new state: the last K - 1 inputs of [state, x]."""
    keep = width - 1
    if x.shape[-1] >= keep:
        return x[..., x.shape[-1] - keep:].contiguous()
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], keep)
    return torch.cat([state, x], dim=-1)[..., -keep:]


class _FusedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, silu, op):  # noqa: D102 - see causal_conv1d
        w = weight.to(compute_dtype(x)).contiguous()
        b = None if bias is None else bias.to(compute_dtype(x)).contiguous()
        ctx.save_for_backward(x, w, b, state)
        ctx.args, ctx.dtypes = (silu, op), (weight.dtype, None if bias is None else bias.dtype)
        return op.conv_fwd(x, w, b, state, silu).transpose(1, 2)  # (B, L, D) storage: x_proj reads it

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # noqa: D102
        x, w, b, state = ctx.saved_tensors
        silu, op = ctx.args
        dx, dw, db, dstate = op.conv_bwd(x, w, b, state, silu, dy)
        return (dx.transpose(1, 2), dw.to(ctx.dtypes[0]), None if b is None else db.to(ctx.dtypes[1]),
                None if state is None else dstate.transpose(1, 2), None, None)


def _fused(x, weight, bias, state, activation):  # CPU, C++ built just in time
    op = require("causal conv1d")
    state = None if state is None else state.to(x.dtype)
    y = _FusedConv.apply(x, weight, bias, state, activation == "silu", op)
    return y, _last_inputs(x, state, weight.shape[-1])


BACKENDS = {"reference": _reference, "torch": _reference, "fused": _fused, "causal_conv1d": _external}


def _auto_rule(device_type: str, tracing: bool) -> str:
    if device_type == "cuda":
        from .registry import backend_importable

        if backend_importable("causal_conv1d"):
            return "causal_conv1d"
    # CPU: the fused op (ATen's depthwise convolution backward alone is ~20 ms at (128, 256, 50) in
    # bf16; benchmarks/cpu_mamba_elementwise.json); traced code takes the reference (cpu_extension.is_tracing)
    return "fused" if fused_rule(device_type, tracing) else "torch"


OP = KernelOp("causal_conv1d", BACKENDS, facts=lambda x: device_facts(x.device), rule=_auto_rule)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, D, L), weight (D, K); returns (y (B, D, L), new state (B, D, K-1))."""
    if weight.dim() == 3:
        weight = weight[:, 0]
    if x.dim() != 3 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"expected x (B, D, L) and weight (D, K), got {tuple(x.shape)}, {tuple(weight.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    name = OP.choose(backend, x)
    return BACKENDS[name](x, weight, bias, state, activation)
