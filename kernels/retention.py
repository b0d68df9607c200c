"""Retention (RetNet without softmax) with a per-head decay gamma_h = exp(lambda_h).

    S_t = gamma S_{t-1} + k_t^T v_t,        o_t = q_t S_t

q and k arrive already rotated and scaled. RetNet's per-row normalisations are left to
the group norm that follows in the mixer: it is invariant to them (up to its eps).

Three exact forms, each carrying the state so that streaming is the same code:
- ``parallel``: one (L x L) decay-masked product (the reference),
- ``chunkwise``: parallel inside chunks, recurrent across them (memory linear in L),
- ``recurrent``: one token at a time.
"""

from __future__ import annotations

import torch

from .dispatch import resolve


def _chunk(q, k, v, log_decay, state):
    """Parallel form on one chunk, starting from ``state`` (B, H, Dk, Dv) or None."""
    length = q.shape[-2]
    pos = torch.arange(length, device=q.device, dtype=q.dtype)
    lam = log_decay.to(q.dtype)[:, None, None]
    dist = pos[:, None] - pos[None, :]
    mask = torch.where(dist >= 0, (lam * dist.clamp(min=0)).exp(), torch.zeros((), dtype=q.dtype, device=q.device))
    out = ((q @ k.transpose(-1, -2)) * mask) @ v
    decay_to_end = (lam[..., 0] * (length - 1 - pos)).exp()  # (H, L)
    new_state = (k * decay_to_end[..., None]).transpose(-1, -2) @ v
    if state is not None:
        decay_from_start = (lam[..., 0] * (pos + 1)).exp()  # (H, L)
        out = out + (q * decay_from_start[..., None]) @ state
        new_state = new_state + (lam * length).exp() * state
    return out, new_state


def _parallel(q, k, v, log_decay, state, chunk_size):
    return _chunk(q, k, v, log_decay, state)


def _chunkwise(q, k, v, log_decay, state, chunk_size):
    outs = []
    for start in range(0, q.shape[-2], chunk_size):
        sl = slice(start, start + chunk_size)
        out, state = _chunk(q[..., sl, :], k[..., sl, :], v[..., sl, :], log_decay, state)
        outs.append(out)
    return torch.cat(outs, dim=-2), state


def _recurrent(q, k, v, log_decay, state, chunk_size):
    b, h, length, dk = q.shape
    if state is None:
        state = q.new_zeros(b, h, dk, v.shape[-1])
    gamma = log_decay.to(q.dtype).exp()[:, None, None]
    outs = []
    for t in range(length):
        state = gamma * state + k[..., t, :, None] * v[..., t, None, :]
        outs.append((q[..., t, None, :] @ state)[..., 0, :])
    return torch.stack(outs, dim=-2), state


BACKENDS = {"parallel": _parallel, "reference": _parallel, "chunkwise": _chunkwise, "recurrent": _recurrent}


def _auto() -> str:
    return "chunkwise"


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retention over (B, H, L, D) tensors; returns (output, final state (B, H, Dk, Dv))."""
    if q.dim() != 4 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"expected (B, H, L, D) q/k/v, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if log_decay.shape != (q.shape[1],):
        raise ValueError(f"log_decay must have one value per head ({q.shape[1]}), got {tuple(log_decay.shape)}")
    name = resolve("retention", backend, BACKENDS, _auto)
    return BACKENDS[name](q, k, v, log_decay, state, chunk_size)
