"""Depthwise causal 1D convolution with a carried state (the last K-1 inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import KernelOp


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
    width = weight.shape[-1]
    y = causal_conv1d_fn(x, weight, bias, activation=activation)
    new_state = F.pad(x, (width - 1, 0))[..., -(width - 1):]
    return y, new_state


BACKENDS = {"reference": _reference, "torch": _reference, "causal_conv1d": _external}


def _auto_rule(device_type: str) -> str:
    if device_type == "cuda":
        from .registry import backend_importable

        if backend_importable("causal_conv1d"):
            return "causal_conv1d"
    return "torch"


OP = KernelOp("causal_conv1d", BACKENDS, facts=lambda x: (x.device.type,), rule=_auto_rule)


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
