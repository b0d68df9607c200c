"""De-focus softmax attention: softmax(q k^T * scale + lambda_h * |t - s|) v.

q and k arrive already rotated (RoPE). ``log_decay`` holds lambda_h <= 0 per head;
for causal attention the bias is lambda_h * (t - s) on s <= t and -inf above.
``q_offset`` is the absolute position of the first query, used when queries are a
suffix of the keys (streaming with a KV cache).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .dispatch import KernelOp


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


def attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, log_decay: torch.Tensor | None = None, causal: bool = True,
    q_offset: int = 0, scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + decay/causal bias) over the keys, (B, H, Lq, Lk): the weights the
    reference backend multiplies v by (what ``output_attentions`` returns)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = decay_bias(log_decay, q.shape[-2], k.shape[-2], causal, q_offset, q.dtype, q.device)
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def _reference(q, k, v, log_decay, causal, q_offset, scale):
    return attention_probabilities(q, k, log_decay, causal, q_offset, scale) @ v


def _sdpa(q, k, v, log_decay, causal, q_offset, scale):
    if log_decay is None and causal and q_offset == 0 and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    bias = decay_bias(log_decay, q.shape[-2], k.shape[-2], causal, q_offset, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


# --- FlexAttention -----------------------------------------------------------------------------
# The decay enters as a score_mod, so no (Lq, Lk) bias is ever materialised and its gradient reaches
# ``log_decay`` through FlexAttention's support for captured tensors. On CUDA the call is compiled
# (fused Triton kernels, forward and backward). On CPU the eager (unfused) path runs forward only:
# PyTorch has no CPU backward for FlexAttention, but ``log_decay`` alone may still require grad
# there, which is what the CPU tests check. The automatic rule never picks "flex" on CPU.
# The two caches below are owned by this section: one compiled flex_attention per process, and the
# causal block masks of the BLOCK_MASK_CACHE most recent (length, device) pairs.
BLOCK_MASK_CACHE = 32


def _flex_causal_mask(b, h, q_idx, kv_idx):  # module level: one function object, no recompiles
    return q_idx >= kv_idx


def _flex_score_mod(log_decay, offset, causal, masked):
    """score + lambda_h * (t - s) with t = q_idx + offset; ``masked`` also applies causality here."""

    def score_mod(score, b, h, q_idx, kv_idx):
        dist = q_idx + offset - kv_idx
        if log_decay is not None:
            score = score + log_decay[h] * (dist if causal else dist.abs())
        if masked:
            score = torch.where(dist >= 0, score, -float("inf"))
        return score

    return score_mod


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_function(device: torch.device):
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.lru_cache(maxsize=BLOCK_MASK_CACHE)
def _flex_block_mask(length: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_flex_causal_mask, None, None, length, length, device=device)


def _flex(q, k, v, log_decay, causal, q_offset, scale):
    import warnings

    if q.device.type != "cuda" and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise NotImplementedError(
            "the 'flex' attention backend cannot differentiate q/k/v on CPU (PyTorch's FlexAttention "
            "has no CPU backward); use backend='sdpa' there, or run on CUDA"
        )
    if log_decay is not None:
        log_decay = log_decay.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    # Training shape (q_offset 0, Lq == Lk): block-sparse causal mask, built once per length.
    # Streaming (q_offset > 0): causality inside the score_mod, with the offset as a tensor so
    # that a new offset is new data, not a new compiled graph.
    use_block_mask = causal and q_offset == 0 and q.shape[-2] == k.shape[-2]
    block_mask = _flex_block_mask(q.shape[-2], q.device) if use_block_mask else None
    offset = torch.tensor(q_offset, dtype=torch.int32, device=q.device)
    masked = causal and not use_block_mask
    score_mod = None
    if log_decay is not None or masked:
        score_mod = _flex_score_mod(log_decay, offset, causal, masked)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _flex_function(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def flex_available() -> bool:
    """FlexAttention present, and Triton to compile it."""
    from .registry import backend_importable

    return backend_importable("flex") and backend_importable("triton")


BACKENDS = {"reference": _reference, "sdpa": _sdpa, "flex": _flex}


def _auto_rule(device_type: str, has_decay: bool) -> str:
    return "flex" if device_type == "cuda" and has_decay and flex_available() else "sdpa"


OP = KernelOp("attention", BACKENDS, facts=lambda q, log_decay: (q.device.type, log_decay is not None),
              rule=_auto_rule)


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
    name = OP.choose(backend, q, log_decay)
    return BACKENDS[name](q, k, v, log_decay, causal, q_offset, scale)
