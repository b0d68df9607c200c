"""De-focus softmax attention: softmax(q k^T * scale + lambda_h * |t - s|) v.

q and k arrive already rotated (RoPE). ``log_decay`` holds lambda_h <= 0 per head;
for causal attention the bias is lambda_h * (t - s) on s <= t and -inf above.
``q_offset`` is the absolute position of the first query, used when queries are a
suffix of the keys (streaming with a KV cache).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import resolve


def decay_bias(
    log_decay: torch.Tensor | None, q_len: int, k_len: int, causal: bool, q_offset: int,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor | None:
    """Additive (H or 1, Lq, Lk) logit bias for decay and causality; None if neither applies."""
    if log_decay is None and not causal:
        return None
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    dist = (q_pos[:, None] - k_pos[None, :]).to(dtype)
    bias = torch.zeros(1, q_len, k_len, dtype=dtype, device=device)
    if log_decay is not None:
        bias = log_decay.to(dtype)[:, None, None] * dist.abs()[None]
    if causal:
        bias = bias.masked_fill((dist < 0)[None], float("-inf"))
    return bias


def _reference(q, k, v, log_decay, causal, q_offset, scale):
    bias = decay_bias(log_decay, q.shape[-2], k.shape[-2], causal, q_offset, q.dtype, q.device)
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


def _sdpa(q, k, v, log_decay, causal, q_offset, scale):
    if log_decay is None and causal and q_offset == 0 and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    bias = decay_bias(log_decay, q.shape[-2], k.shape[-2], causal, q_offset, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


BACKENDS = {"reference": _reference, "sdpa": _sdpa}


def defocus_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    causal: bool = True,
    q_offset: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over (B, H, L, Dh) tensors with optional per-head distance decay."""
    if q.dim() != 4 or k.shape != v.shape[:-1] + k.shape[-1:]:
        raise ValueError(f"expected (B, H, L, D) q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    name = resolve("attention", backend, BACKENDS, lambda: "sdpa")
    return BACKENDS[name](q, k, v, log_decay, causal, q_offset, scale)
