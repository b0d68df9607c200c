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

from .dispatch import KernelOp, compute_dtype

LOW_PRECISION = (torch.bfloat16, torch.float16)
_DISTANCES: dict = {}  # (Lq, Lk, q_offset, causal, dtype, device) -> (|t - s|, causal mask): constants


def _distances(q_len: int, k_len: int, causal: bool, q_offset: int, dtype: torch.dtype, device: torch.device):
    """|t - s| (Lq, Lk) and the causal mask (0 where s <= t, -inf where s > t; None when not causal), built
    once per shape: only ``log_decay`` (which may be learned) is multiplied in at each call."""
    key = (q_len, k_len, causal, q_offset, dtype, str(device))
    hit = None if torch.compiler.is_compiling() else _DISTANCES.get(key)
    if hit is None:
        dist = (torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
                - torch.arange(k_len, device=device)[None, :]).to(dtype)
        mask = torch.zeros_like(dist).masked_fill_(dist < 0, float("-inf")) if causal else None
        hit = dist.abs(), mask
        if not torch.compiler.is_compiling():
            if len(_DISTANCES) >= 64:  # streaming walks through offsets: keep the latest shapes
                _DISTANCES.pop(next(iter(_DISTANCES)))
            _DISTANCES[key] = hit
    return hit


def decay_bias(
    log_decay: torch.Tensor | None, q_len: int, k_len: int, causal: bool, q_offset: int,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor | None:
    """Additive (H or 1, Lq, Lk) logit bias for decay and causality; None if neither applies."""
    if log_decay is None and not causal:
        return None
    distance, mask = _distances(q_len, k_len, causal, q_offset, dtype, device)
    if log_decay is None:
        return mask[None]
    bias = log_decay.to(dtype)[:, None, None] * distance[None]
    return bias if mask is None else bias + mask


def attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, log_decay: torch.Tensor | None = None, causal: bool = True,
    q_offset: int = 0, scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + decay/causal bias) over the keys, (B, H, Lq, Lk): the weights the
    reference backend multiplies v by (what ``output_attentions`` returns)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # bf16/fp16 inputs: the logits, the decay bias and the softmax in float32 (as fused kernels do)
    logits_dtype = torch.float32 if q.dtype in LOW_PRECISION else q.dtype
    bias = decay_bias(log_decay, q.shape[-2], k.shape[-2], causal, q_offset, logits_dtype, q.device)
    scores = (q @ k.transpose(-1, -2)).to(logits_dtype) * scale
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1).to(q.dtype)


def _reference(q, k, v, log_decay, causal, q_offset, scale):
    return attention_probabilities(q, k, log_decay, causal, q_offset, scale) @ v


# Inference, causal, square: lambda (t - s) = lambda t - lambda s, and the per-query lambda t cancels in the
# softmax. The per-key -lambda s rides in one extra q.k dimension (q: 1, k: -lambda s / scale; v: 0), so SDPA
# takes its causal fast path (it skips the masked half) instead of a full (L, L) bias: 1.9x faster at ViT-S's
# 197 tokens on CPU. Not under autograd (there its backward was slower than the bias path), and only in
# float32/64 with max |lambda| * L <= KEY_DECAY_MAX: the extra logit's rounding then stays under ~1e-5.
KEY_DECAY_MAX = 64.0


def _key_decay_applies(q, k, v, log_decay, causal, q_offset) -> bool:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, log_decay))
    return (not grad and causal and q_offset == 0 and q.shape[-2] == k.shape[-2] and v.shape[-1] == q.shape[-1]
            and q.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
            and float(-log_decay.min()) * q.shape[-2] <= KEY_DECAY_MAX)


def _key_decay_sdpa(q, k, v, log_decay, scale):
    key_term = -log_decay.to(q.dtype)[:, None] * torch.arange(q.shape[-2], device=q.device, dtype=q.dtype) / scale
    q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
    k = torch.cat([k, key_term.expand(k.shape[:-1])[..., None]], dim=-1)
    v = torch.cat([v, torch.zeros_like(v[..., :1])], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :-1]


def _sdpa(q, k, v, log_decay, causal, q_offset, scale):
    if log_decay is None and causal and q_offset == 0 and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if log_decay is not None and _key_decay_applies(q, k, v, log_decay, causal, q_offset):
        return _key_decay_sdpa(q, k, v, log_decay, scale)
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
        log_decay = log_decay.to(compute_dtype(q))
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


# CPU training in bf16/fp16: SDPA's CPU kernels are slow there (forward + backward at Fashion-MNIST's 50
# tokens 33 ms against 6 ms for the reference with float32 logits; 197 tokens 25 vs 8 ms; equal at 1024:
# benchmarks/README.md), so up to REFERENCE_MAX_LENGTH keys the reference runs. Inference and float32 keep SDPA.
REFERENCE_MAX_LENGTH = 1024


def _facts(q: torch.Tensor, k: torch.Tensor, log_decay: torch.Tensor | None) -> tuple:
    low_precision_grad = (q.dtype in LOW_PRECISION and torch.is_grad_enabled()
                          and (q.requires_grad or k.requires_grad))
    return q.device.type, log_decay is not None, low_precision_grad and k.shape[-2] <= REFERENCE_MAX_LENGTH


def _auto_rule(device_type: str, has_decay: bool, short_low_precision_grad: bool) -> str:
    if device_type == "cuda":
        return "flex" if has_decay and flex_available() else "sdpa"
    return "reference" if device_type == "cpu" and short_low_precision_grad else "sdpa"


OP = KernelOp("attention", BACKENDS, facts=_facts, rule=_auto_rule)


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
    name = OP.choose(backend, q, k, log_decay)
    return BACKENDS[name](q, k, v, log_decay, causal, q_offset, scale)
