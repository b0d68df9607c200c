"""Retention (RetNet without softmax) with a per-head decay gamma_h = exp(lambda_h).

    S_t = gamma S_{t-1} + k_t^T v_t,        o_t = q_t S_t

q and k arrive already rotated and scaled. RetNet's per-row normalisations are left to
the group norm that follows in the mixer: it is invariant to them (up to its eps).

Half-precision inputs: positions, decays and the state are computed in float32 (as fla's kernels do
inside, and as the selective scan does), since bf16 holds token positions exactly only up to 256, rounds a
decay of 0.998 to 1.0, and a bf16 state would lose 2^-8 of itself at every streamed step; the (L x L)
products stay in the input dtype, as in fla. The output comes back in the input dtype, the state in float32.

Three exact forms, each carrying the state so that streaming is the same code:
- ``parallel``: one (L x L) decay-masked product (the reference),
- ``chunkwise``: parallel inside chunks, recurrent across them (memory linear in L),
- ``recurrent``: one token at a time.
"""

from __future__ import annotations

import torch

from .dispatch import KernelOp, compute_dtype


def _chunk(q, k, v, log_decay, state):
    """Parallel form on one chunk, starting from ``state`` (B, H, Dk, Dv) or None. Positions, decays and the
    state are in the compute dtype; the (L x L) products stay in q's dtype (bf16 matmuls, fast on CPU), with
    the decays rounded to it once."""
    length, dtype = q.shape[-2], compute_dtype(q)
    pos = torch.arange(length, device=q.device, dtype=dtype)
    lam = log_decay.to(dtype)[:, None, None]
    dist = pos[:, None] - pos[None, :]
    mask = torch.where(dist >= 0, (lam * dist.clamp(min=0)).exp(), torch.zeros((), dtype=dtype, device=q.device))
    out = ((q @ k.transpose(-1, -2)) * mask.to(q.dtype)) @ v
    decay_to_end = (lam[..., 0] * (length - 1 - pos)).exp().to(q.dtype)  # (H, L)
    new_state = ((k * decay_to_end[..., None]).transpose(-1, -2) @ v).to(dtype)
    if state is not None:
        state = state.to(dtype)
        decay_from_start = (lam[..., 0] * (pos + 1)).exp()  # (H, L)
        out = out + ((q.to(dtype) * decay_from_start[..., None]) @ state).to(q.dtype)
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
    """One token at a time, all in the compute dtype (a streamed step is small; its state must not be
    rounded to bf16 at every step)."""
    (b, h, length, dk), in_dtype, dtype = q.shape, q.dtype, compute_dtype(q)
    state = q.new_zeros(b, h, dk, v.shape[-1], dtype=dtype) if state is None else state.to(dtype)
    gamma = log_decay.to(dtype).exp()[:, None, None]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    outs = []
    for t in range(length):
        state = gamma * state + k[..., t, :, None] * v[..., t, None, :]
        outs.append((q[..., t, None, :] @ state)[..., 0, :])
    return torch.stack(outs, dim=-2).to(in_dtype), state


# --- fla (flash-linear-attention) -------------------------------------------------------------------
# Retention is fla's "simple GLA" with a per-head, data-independent log decay (``g_gamma``).
# fla's g_gamma path returns NO gradient for g_gamma (its autograd backward gives None there, checked
# against fla-core 0.6.0's source). So when the decay must be learned, it is passed instead as the
# per-step gate ``g`` = log_decay broadcast to (B, L, H): same recurrence, and fla's backward returns
# dg, which autograd sums over (B, L) into d log_decay, the exact gradient. Inference uses g_gamma.
# q and k arrive already scaled, so scale=1.0 (fla's default would multiply by Dk^-1/2 again).
# fla picks its own chunk length (64); ``chunk_size`` is unused here. Checked once on CPU by running
# fla-core 0.6.0's fused_recurrent_simple_gla in Triton's interpreter: output, final state and the
# gradients of q, k, v, log_decay and the initial state matched ``_parallel`` to ~1e-6 (its chunk
# kernel does not run in the interpreter, so the chunked path is tested on CUDA only).
FLA_RECURRENT_MAX_LEN = 16  # at or below this many tokens (a streaming step), the recurrent kernel


def _fla_call(fn, q, k, v, log_decay, state):
    import inspect

    params = inspect.signature(fn).parameters
    batch, heads, length = q.shape[:3]
    need_decay_grad = torch.is_grad_enabled() and log_decay.requires_grad
    kwargs = {"scale": 1.0, "output_final_state": True}
    if state is not None:
        kwargs["initial_state"] = state.to(torch.float32)
    if "head_first" in params:  # older fla releases default to (B, H, T, D); we pass (B, T, H, D)
        kwargs["head_first"] = False
    if need_decay_grad or "g_gamma" not in params:
        kwargs["g"] = log_decay.to(torch.float32)[None, None, :].expand(batch, length, heads)
    else:
        kwargs["g_gamma"] = log_decay.to(torch.float32)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out, final = fn(qt, kt, vt, **kwargs)
    return out.transpose(1, 2).to(q.dtype), final.to(compute_dtype(q))


def _fla(q, k, v, log_decay, state, chunk_size):  # pragma: no cover - needs CUDA + fla
    if q.shape[-2] <= FLA_RECURRENT_MAX_LEN:
        from fla.ops.simple_gla import fused_recurrent_simple_gla as fn
    else:
        from fla.ops.simple_gla import chunk_simple_gla as fn
    return _fla_call(fn, q, k, v, log_decay, state)


BACKENDS = {
    "parallel": _parallel, "reference": _parallel, "chunkwise": _chunkwise, "recurrent": _recurrent,
    "fla": _fla,
}


# The automatic rule's parallel form on CPU: sequences of one chunk (64 tokens; chunkwise is the same
# product there) whose (B x H x L x L) scores stay small. Beyond one chunk chunkwise was faster forward at
# every length measured (benchmarks/cpu_retention_rule.json: 0.73x at 128, 0.74x at 197, 0.11x at 256;
# issue 20: 0.69x fwd, 0.87x fwd+bwd at 197); at L=1024 it is 6-9x faster (benchmarks/cpu_kernels.json).
PARALLEL_MAX_LENGTH = 64
PARALLEL_MAX_SCORES = 64 * 2**20


def _facts(q: torch.Tensor) -> tuple[str, bool]:
    """(device type, short enough for the parallel form)."""
    batch, heads, length, _ = q.shape
    return q.device.type, length <= PARALLEL_MAX_LENGTH and batch * heads * length * length <= PARALLEL_MAX_SCORES


def _auto_rule(device_type: str, short: bool) -> str:
    if device_type == "cuda":
        from .registry import backend_importable

        if backend_importable("fla"):
            return "fla"
    return "parallel" if short else "chunkwise"


OP = KernelOp("retention", BACKENDS, facts=_facts, rule=_auto_rule)


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
    name = OP.choose(backend, q)
    return BACKENDS[name](q, k, v, log_decay, state, chunk_size)
