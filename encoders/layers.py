"""Small building blocks shared by every encoder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from defocus_vlm.kernels.dispatch import compute_dtype


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole residual branches per sample, rescale the kept ones."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-layer rates linspace(0, rate, depth): deeper layers are dropped more often. Plain Python
    floats, never a tensor: a traced forward (torch.export / compile) must not read tensor data."""
    rate = float(rate)
    return [rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [rate] * depth


class PatchEmbed(nn.Module):
    """Non-overlapping patches flattened in raster order (row by row)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RMSNorm(nn.Module):
    """RMS norm computed in float32, weight applied in the input dtype (Mamba's convention)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(compute_dtype(x))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # A half-precision weight sets the output dtype: a bf16 MambaBlock hands its float32
        # residual (residual_in_fp32) to this norm and needs bf16 out for its bf16 projections.
        # Otherwise the output has the promoted dtype of x and the weight (as weight * x would).
        half = self.weight.dtype in (torch.float16, torch.bfloat16)
        dtype = self.weight.dtype if half else torch.promote_types(x.dtype, self.weight.dtype)
        return (self.weight * normed).to(dtype)  # scaled in float32, rounded once


def retnet_decay_init(num_heads: int) -> torch.Tensor:
    """RetNet's per-head log-decay log(1 - 2^(-5-h)): head h looks about 2^(5+h) tokens back."""
    return torch.log(1 - 2.0 ** (-5 - torch.arange(num_heads, dtype=torch.float64))).float()


def rope_inv_freq(dim: int, base: float) -> torch.Tensor:
    """Standard RoPE frequencies base^(-2j/dim), one per rotated pair (dim/2 values)."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim).float()


def init_linear(module: nn.Module) -> None:
    """timm-style init: truncated normal(0.02) weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        module.reset_parameters()


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def pos_embed_for_grid(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a (1, H*W, D) grid of position embeddings to a new grid."""
    if src == dst:
        return pos
    grid = pos.reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=dst, mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], -1)


__all__ = [
    "Mlp", "PatchEmbed", "RMSNorm", "drop_path", "drop_path_rates", "init_linear",
    "inverse_softplus", "pos_embed_for_grid", "retnet_decay_init", "rope_inv_freq",
]
