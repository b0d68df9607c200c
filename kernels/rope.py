"""Rotary position embedding with per-element angles ("rotate every two").

Pairs are (2i, 2i+1). Each element k gets its own angle n * freq_k. When the two
members of a pair share a frequency (the tied / paper form) this is an exact rotation,
so q_t . k_s depends on t - s only. The official De-focus Mamba uses one frequency per
element (untied), which this same function reproduces.
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Angles ``positions[:, None] * freqs[None, :]`` of shape (L, K)."""
    return positions.to(freqs.dtype)[:, None] * freqs[None, :]


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of the last dim of ``x`` by ``angles`` (broadcast to x).

    out[2i]   = x[2i]   cos a[2i]   - x[2i+1] sin a[2i]
    out[2i+1] = x[2i+1] cos a[2i+1] + x[2i]   sin a[2i+1]
    """
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even feature size, got {x.shape[-1]}")
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x_pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack((-x_pairs[..., 1], x_pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + swapped * sin


def apply_rope_tied(x: torch.Tensor, pair_angles: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` with one angle per pair: ``pair_angles`` (..., K/2) broadcast to x's pairs.

    Equal to ``apply_rope(x, pair_angles.repeat_interleave(2, -1))`` (the reference; parity-tested), as one
    complex multiply: forward and backward touch x once instead of through six real ops, and the angles'
    gradient is one reduction instead of two (cos and sin)."""
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even feature size, got {x.shape[-1]}")
    if x.dtype not in (torch.float32, torch.float64) or x.stride(-1) != 1 or x.storage_offset() % 2:
        return apply_rope(x, pair_angles.repeat_interleave(2, dim=-1))
    angles = pair_angles.to(x.dtype)
    rotation = torch.complex(angles.cos(), angles.sin())
    pairs = x.unflatten(-1, (-1, 2))
    if any(s % 2 for s in pairs.stride()[:-1]):  # view_as_complex needs whole complex strides
        pairs = pairs.contiguous()
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)
