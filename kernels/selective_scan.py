"""Selective scan (Mamba's S6 recurrence), mamba-ssm's tensor layout.

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,    y_t = C_t . h_t (+ D u_t) (* silu(z_t))

u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L) (already RoPE'd by the caller); D: (D,).
Half-precision inputs are computed in float32 and returned in the input dtype. With
``delta_softplus`` (mamba-ssm's flag) the scan uses softplus(delta); the fused backends apply it inside
the kernel, the others first (in the compute dtype).

Backends
- ``reference``: the recurrence, one token at a time (the source of truth).
- ``fused``: a C++ op built just in time (``selective_scan_cpu``), forward and backward in one
  pass each over the sequence with the state in L1, threads over (batch, channel blocks); CPU.
- ``chunked``: exact chunked scan in PyTorch. Inside a chunk h_t is a cumulative sum
  rescaled by exp(P_t) with P the running log-decay; chunks are sized from the data so
  that exp(-P) never exceeds exp(limit), which keeps it exact and overflow-free. Chunk
  states are then carried across chunks with a short loop.
- ``triton``: a fused Triton kernel (forward and backward), state in registers (CUDA; tested on
  CPU under ``TRITON_INTERPRET=1``).
- ``mamba_ssm``: mamba-ssm's CUDA kernel when it is importable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cpu_extension import device_facts, fused_rule
from .dispatch import KernelOp, compute_dtype


def check_scan_shapes(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      initial_state: torch.Tensor | None = None) -> None:
    """A ValueError naming the first argument whose shape does not fit the layout above (every backend
    checks through here)."""
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"expected u, delta (B, D, L) and A (D, N), got {tuple(u.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(A.shape)}")
    batch, dim, length = u.shape
    expected = {"B": (batch, A.shape[1], length), "C": (batch, A.shape[1], length), "D": (dim,),
                "z": tuple(u.shape), "initial_state": (batch, dim, A.shape[1])}
    for name, tensor in {"B": B, "C": C, "D": D, "z": z, "initial_state": initial_state}.items():
        if tensor is not None and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must be {expected[name]}, got {tuple(tensor.shape)}")


def _finish(y, u, D, z):
    if D is not None:
        y = y + D[:, None].to(y.dtype) * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _softplus_first(backend):
    """A backend without its own softplus: delta = softplus(delta) in the compute dtype first."""
    def run(u, delta, A, B, C, D, z, initial_state, max_chunk, delta_softplus):
        if delta_softplus:
            delta = F.softplus(delta.to(compute_dtype(u)))
        return backend(u, delta, A, B, C, D, z, initial_state, max_chunk)

    return run


def _reference(u, delta, A, B, C, D, z, initial_state, max_chunk):
    dt = compute_dtype(u)
    u, delta, A, B, C = (t.to(dt) for t in (u, delta, A, B, C))
    decay = torch.exp(delta[..., None] * A[:, None, :])  # (B, D, L, N)
    inp = (delta * u)[..., None] * B.transpose(1, 2)[:, None]  # (B, D, L, N)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.to(dt)
    ys = []
    # unbind, not decay[:, :, t]: the backward of one select fills a whole (B, D, L, N) zero gradient
    for decay_t, inp_t, c_t in zip(decay.unbind(2), inp.unbind(2), C.unbind(-1)):
        h = decay_t * h + inp_t
        ys.append((h * c_t[:, None]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    return _finish(y, u, D, z), h


def max_decay_rate(delta: torch.Tensor, A: torch.Tensor) -> float:
    """max over (b, d, l, n) of -delta[b, d, l] * A[d, n], without building the (B, D, L, N) product:
    a product's extremes over l and n are among the four products of their extremes."""
    if delta.numel() == 0 or A.numel() == 0:
        return 0.0
    d_hi, d_lo = delta.detach().amax(-1), delta.detach().amin(-1)  # (B, D)
    a_hi, a_lo = (-A.detach()).amax(-1), (-A.detach()).amin(-1)  # (D,)
    return float(torch.stack([d_hi * a_hi, d_hi * a_lo, d_lo * a_hi, d_lo * a_lo]).amax())


def chunk_length(rate: float, max_chunk: int, limit: float) -> int:
    """Longest chunk whose running log-decay (first step excluded) stays within ``limit`` when each
    step decays by at most ``rate`` (see :func:`max_decay_rate`)."""
    if rate <= 0.0 or not math.isfinite(rate):
        return max_chunk if rate <= 0.0 else 1
    return max(1, min(max_chunk, 1 + int(limit / rate)))


def _chunked(u, delta, A, B, C, D, z, initial_state, max_chunk):
    dt = compute_dtype(u)
    u, delta, A, B, C = (t.to(dt) for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    n = A.shape[1]
    limit = 60.0 if dt == torch.float32 else 600.0
    size = min(chunk_length(max_decay_rate(delta, A), max_chunk, limit), max(length, 1))
    pad = (-length) % size
    du = delta * u
    if pad:  # pad the small (B, D, L) / (B, N, L) inputs, not the (B, D, L, N) products
        delta, du, C = (F.pad(t, (0, pad)) for t in (delta, du, C))
        B = F.pad(B, (0, pad))
    chunks = (length + pad) // size
    log_decay = (delta[..., None] * A[:, None, :]).view(batch, dim, chunks, size, n)  # <= 0
    # (B, L, N) made contiguous first: a strided operand would give the products an L-fastest layout
    inp = (du[..., None] * B.transpose(1, 2).contiguous()[:, None]).view(batch, dim, chunks, size, n)
    ct = C.transpose(1, 2).reshape(batch, chunks, size, n)
    # P_t: log-decay accumulated after each chunk's first token, so exp(P_t - P_s) (s <= t)
    # is the decay from s to t and exp(-P) stays <= exp(limit).
    run = log_decay.cumsum(dim=3)
    p = run - log_decay[:, :, :, :1]
    local = torch.exp(p) * torch.cumsum(torch.exp(-p) * inp, dim=3)
    h = None if initial_state is None else initial_state.to(dt)
    states = local
    if chunks > 1 or h is not None:  # carry each chunk's start state in (one chunk from zero needs none)
        carry_in = torch.exp(run)  # decay from the previous chunk's end state to each t
        h = u.new_zeros(batch, dim, n) if h is None else h
        starts = []  # padding has zero log-decay and zero input, so the end state is the last token's
        for c in range(chunks):
            starts.append(h)
            h = carry_in[:, :, c, -1] * h + local[:, :, c, -1]
        states = local + carry_in * torch.stack(starts, dim=2)[:, :, :, None]
    else:
        h = local[:, :, -1, -1]
    y = (states * ct[:, None]).sum(-1)
    y = y.reshape(batch, dim, -1)[..., :length]
    return _finish(y, u, D, z), h


def _mamba_ssm(u, delta, A, B, C, D, z, initial_state, max_chunk, delta_softplus):  # pragma: no cover - CUDA only
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if initial_state is not None:  # mamba-ssm's scan starts from zero: a streamed chunk takes the chunked scan
        return BACKENDS["chunked"](u, delta, A, B, C, D, z, initial_state, max_chunk, delta_softplus)
    y, last = selective_scan_fn(u, delta.to(u.dtype), A.float(), B, C, D, z, delta_softplus=delta_softplus,
                                return_last_state=True)  # one dtype
    return y, last


def _triton(u, delta, A, B, C, D, z, initial_state, max_chunk):  # CUDA (or the Triton interpreter)
    from .selective_scan_triton import selective_scan_triton

    y, last = selective_scan_triton(u, delta.to(u.dtype), A, B, C, D, z, initial_state)  # one dtype, as before
    return y, last.to(compute_dtype(u))


def _fused(u, delta, A, B, C, D, z, initial_state, max_chunk, delta_softplus):  # CPU, C++ built just in time
    from .selective_scan_cpu import fused_selective_scan

    return fused_selective_scan(u, delta, A, B, C, D, z, initial_state, delta_softplus=delta_softplus)


BACKENDS = {"reference": _softplus_first(_reference), "chunked": _softplus_first(_chunked), "fused": _fused,
            "mamba_ssm": _mamba_ssm, "triton": _softplus_first(_triton)}


def _auto_rule(device_type: str, tracing: bool) -> str:
    if device_type == "cuda":
        from .registry import backend_importable

        for backend in ("mamba_ssm", "triton"):
            if backend_importable(backend):
                return backend
        return "reference"
    # CPU (never triton: there it only runs in the slow interpreter). The fused C++ scan when it
    # builds (benchmarks/cpu_fused_scan.json); else the token-by-token recurrence, the fastest
    # PyTorch form forward and backward (1.3-3x the chunked scan forward, 3-13x forward+backward
    # at 197-4096 tokens; benchmarks/cpu_selective_scan.json).
    # Traced code (torch.export / torch.compile) takes the recurrence: see cpu_extension.is_tracing.
    return "fused" if fused_rule(device_type, tracing) else "reference"


OP = KernelOp("selective_scan", BACKENDS, facts=lambda u: device_facts(u.device), rule=_auto_rule)


def auto_backend(device: torch.device | str) -> str:
    """The backend ``backend="auto"`` picks for tensors on ``device`` (without the
    ``DEFOCUS_KERNELS`` override). On CPU this builds the fused op the first time it is asked."""
    return OP.rule(*device_facts(device))


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_last_state: bool = False,
    max_chunk: int = 128,
    backend: str = "auto",
    delta_softplus: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the selective scan; returns y (B, D, L) and, if asked, the last state (B, D, N)."""
    check_scan_shapes(u, delta, A, B, C, D, z, initial_state)
    name = OP.choose(backend, u)
    y, last = BACKENDS[name](u, delta, A, B, C, D, z, initial_state, max_chunk, delta_softplus)
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y
