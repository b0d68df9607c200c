"""Fused selective scan in Triton: forward and backward, fp32 inside.

Same semantics as ``selective_scan._reference``:

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = C_t . h_t (+ D u_t) (* silu(z_t))

Layout (mamba-ssm's): u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D (D,);
initial state (B, D, N). Returns y (B, D, L) in u's dtype and the last state (B, D, N) in fp32.

How it runs
- One program per (batch, block of ``BLOCK_D`` channels). It walks the sequence in tiles of
  ``BLOCK_T`` steps; each tile is loaded with coalesced (channels x time) / (state x time) loads,
  the (BLOCK_D, N, BLOCK_T) decays a = exp(delta A) and inputs b = delta u B are built in
  registers, and the tile's states come from an associative scan of the affine maps
  h -> a h + b along time, seeded with the state carried in registers from the previous tile.
  No value ever leaves the chip except the inputs, y, and one checkpoint per tile.
- Forward stores the state at the start of every tile (fp32, (B, D, L / BLOCK_T, N)):
  the backward recomputes each tile's states from its checkpoint instead of storing all L
  states (memory: N / BLOCK_T times the size of u in fp32).
- Backward walks the tiles last to first. The adjoint state g_t = dL/dh_t obeys
  g_t = gy_t C_t + exp(delta_{t+1} A) g_{t+1}, a reversed affine recurrence scanned the same way;
  the carry between tiles is exp(delta_s A) g_s at the tile's first step s. The decay's gradient
  uses a_t h_{t-1} = h_t - b_t, so no state has to be shifted or divided.
  Gradients: u, delta, A, B, C, D, z, the initial state, and the returned last state's gradient
  flows in as well. Cross-channel sums (dB, dC) and cross-batch sums (dA, dD) are written per
  program and reduced in PyTorch: deterministic, no atomics.

Scans run on 2-D (rows x time) views along the last axis, the form Triton's own test-suite
covers for non-commutative combines, forward and reversed.

On CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before this
module is imported); that is how the tests check them. Block sizes are reasonable defaults, not
tuned on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .selective_scan import check_scan_shapes

DEFAULT_BLOCK_T = 32
# (BLOCK_D * N_PAD * BLOCK_T) elements per 3-D register tile; backward holds more tiles at once.
_FWD_TILE_BUDGET = 4096
_BWD_TILE_BUDGET = 2048


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (a1, b1) is applied first, then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_time(a, b, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
               REVERSE: tl.constexpr):
    """Inclusive scan of the affine maps (a, b) along the last (time) axis of (BLOCK_D, N_PAD, BLOCK_T)."""
    a2 = tl.reshape(a, (BLOCK_D * N_PAD, BLOCK_T))
    b2 = tl.reshape(b, (BLOCK_D * N_PAD, BLOCK_T))
    a2, b2 = tl.associative_scan((a2, b2), axis=1, combine_fn=_affine_combine, reverse=REVERSE)
    return tl.reshape(a2, (BLOCK_D, N_PAD, BLOCK_T)), tl.reshape(b2, (BLOCK_D, N_PAD, BLOCK_T))


@triton.jit
def _program_layout(dim, length, nstate, n_tiles, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    """This program's (batch, channel block): offsets, masks, and the row offsets of the (B, D, L)
    sequences, the (B, N, L) B/C, the (B, D, N) states and the (B, D, n_tiles, N) checkpoints."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N_PAD)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < dim
    mask_n = offs_n < nstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    seq_rows = pid_b * dim * length + offs_d[:, None].to(tl.int64) * length  # (BLOCK_D, 1)
    bc_rows = pid_b * nstate * length + offs_n[:, None] * length  # (N_PAD, 1)
    state_off = pid_b * dim * nstate + offs_d[:, None] * nstate + offs_n[None, :]
    ckpt_off = (pid_b * dim + offs_d[:, None]) * n_tiles * nstate + offs_n[None, :]
    return pid_b, pid_d, offs_d, offs_n, offs_t, mask_d, mask_n, mask_dn, seq_rows, bc_rows, state_off, ckpt_off


@triton.jit
def _load_params(A_ptr, D_ptr, offs_d, offs_n, mask_d, mask_dn, nstate, HAS_D: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """A (BLOCK_D, N_PAD) and D (BLOCK_D,; zeros without D) in float32."""
    A = tl.load(A_ptr + offs_d[:, None] * nstate + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    return A, Dv


@triton.jit
def _load_tile(u_ptr, delta_ptr, B_ptr, C_ptr, seq_rows, bc_rows, t, mask_d, mask_n, length):
    """Time tile ``t`` of u, delta (BLOCK_D, BLOCK_T) and B, C (N_PAD, BLOCK_T) in float32, with the
    masks of the two shapes."""
    mask_t = t < length
    m_dt = mask_d[:, None] & mask_t[None, :]
    m_nt = mask_n[:, None] & mask_t[None, :]
    u = tl.load(u_ptr + seq_rows + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
    dl = tl.load(delta_ptr + seq_rows + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + bc_rows + t[None, :], mask=m_nt, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bc_rows + t[None, :], mask=m_nt, other=0.0).to(tl.float32)
    return u, dl, Bt, Ct, mask_t, m_dt, m_nt


@triton.jit
def _tile_states(u, dl, Bt, A, h, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """The states of one tile from its start state ``h``: per-step decay a, input b, states hs (all
    (BLOCK_D, N_PAD, BLOCK_T)). Padded steps/channels/states have delta = 0 or A = 0: decay 1, input 0."""
    a = tl.exp(dl[:, None, :] * A[:, :, None])
    b = (dl * u)[:, None, :] * Bt[None, :, :]
    a_cum, b_cum = _scan_time(a, b, BLOCK_D, N_PAD, BLOCK_T, False)
    return a, b, a_cum * h[:, :, None] + b_cum


@triton.jit
def _tile_output(hs, Ct, u, Dv, HAS_D: tl.constexpr):
    """y = C . h (+ D u), before the gate."""
    y = tl.sum(hs * Ct[None, :, :], axis=1)
    if HAS_D:
        y += Dv[:, None] * u
    return y


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, h0_ptr,
    y_ptr, last_ptr, ckpt_ptr,
    dim, length, nstate, n_tiles,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    (pid_b, pid_d, offs_d, offs_n, offs_t, mask_d, mask_n, mask_dn, seq_rows, bc_rows, state_off,
     ckpt_off) = _program_layout(dim, length, nstate, n_tiles, BLOCK_D, N_PAD, BLOCK_T)
    A, Dv = _load_params(A_ptr, D_ptr, offs_d, offs_n, mask_d, mask_dn, nstate, HAS_D, BLOCK_D)

    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)

    for k in range(0, n_tiles):
        tl.store(ckpt_ptr + ckpt_off + k * nstate, h, mask=mask_dn)
        t = k * BLOCK_T + offs_t
        u, dl, Bt, Ct, mask_t, m_dt, m_nt = _load_tile(u_ptr, delta_ptr, B_ptr, C_ptr, seq_rows, bc_rows, t,
                                                       mask_d, mask_n, length)
        a, b, hs = _tile_states(u, dl, Bt, A, h, BLOCK_D, N_PAD, BLOCK_T)
        y = _tile_output(hs, Ct, u, Dv, HAS_D)
        if HAS_Z:
            zt = tl.load(z_ptr + seq_rows + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
            y = y * zt * tl.sigmoid(zt)
        tl.store(y_ptr + seq_rows + t[None, :], y.to(y_ptr.dtype.element_ty), mask=m_dt)
        # padded steps leave the state unchanged: the last column is the state at the last valid step
        h = tl.sum(tl.where(offs_t[None, None, :] == BLOCK_T - 1, hs, 0.0), axis=2)

    tl.store(last_ptr + state_off, h, mask=mask_dn)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, ckpt_ptr, dy_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dh0_ptr,
    dim, length, nstate, n_tiles, n_dblocks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    (pid_b, pid_d, offs_d, offs_n, offs_t, mask_d, mask_n, mask_dn, seq_rows, bc_rows, state_off,
     ckpt_off) = _program_layout(dim, length, nstate, n_tiles, BLOCK_D, N_PAD, BLOCK_T)
    A, Dv = _load_params(A_ptr, D_ptr, offs_d, offs_n, mask_d, mask_dn, nstate, HAS_D, BLOCK_D)
    # per-(batch, channel block) partial sums of dB, dC: (B, n_dblocks, N, L)
    part_rows = ((pid_b * n_dblocks + pid_d) * nstate + offs_n[:, None]) * length

    # carry = exp(delta_s A) * dL/dh_s at the first step s of the tile after this one
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    for kk in range(0, n_tiles):
        k = n_tiles - 1 - kk
        h0 = tl.load(ckpt_ptr + ckpt_off + k * nstate, mask=mask_dn, other=0.0)
        t = k * BLOCK_T + offs_t
        u, dl, Bt, Ct, mask_t, m_dt, m_nt = _load_tile(u_ptr, delta_ptr, B_ptr, C_ptr, seq_rows, bc_rows, t,
                                                       mask_d, mask_n, length)
        gout = tl.load(dy_ptr + seq_rows + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
        # delta one step ahead inside this tile (the tile's last step takes the carry instead)
        m_next = mask_d[:, None] & ((offs_t < BLOCK_T - 1) & (t + 1 < length))[None, :]
        dl_next = tl.load(delta_ptr + seq_rows + t[None, :] + 1, mask=m_next, other=0.0).to(tl.float32)

        # recompute this tile's states from its checkpoint
        a, b, hs = _tile_states(u, dl, Bt, A, h0, BLOCK_D, N_PAD, BLOCK_T)

        if HAS_Z:
            zt = tl.load(z_ptr + seq_rows + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
            y = _tile_output(hs, Ct, u, Dv, HAS_D)
            sig = tl.sigmoid(zt)
            dz = gout * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_ptr + seq_rows + t[None, :], dz, mask=m_dt)
            gy = gout * zt * sig
        else:
            gy = gout

        # adjoint states g_t = gy_t C_t + exp(delta_{t+1} A) g_{t+1}, scanned backwards in time
        alpha = tl.exp(dl_next[:, None, :] * A[:, :, None])
        beta = gy[:, None, :] * Ct[None, :, :]
        al_cum, be_cum = _scan_time(alpha, beta, BLOCK_D, N_PAD, BLOCK_T, True)
        gh = be_cum + al_cum * carry[:, :, None]
        gh = tl.where(mask_t[None, None, :], gh, 0.0)

        decayed = hs - b  # = exp(delta_t A) h_{t-1}
        gq = gh * decayed
        ddl = tl.sum(gh * u[:, None, :] * Bt[None, :, :] + gq * A[:, :, None], axis=1)
        du = tl.sum(gh * Bt[None, :, :], axis=1) * dl
        if HAS_D:
            du += gy * Dv[:, None]
            dD_acc += tl.sum(gy * u, axis=1)
        dB = tl.sum(gh * (dl * u)[:, None, :], axis=0)
        dC = tl.sum(gy[:, None, :] * hs, axis=0)
        dA_acc += tl.sum(gq * dl[:, None, :], axis=2)
        tl.store(du_ptr + seq_rows + t[None, :], du, mask=m_dt)
        tl.store(ddelta_ptr + seq_rows + t[None, :], ddl, mask=m_dt)
        tl.store(dB_ptr + part_rows + t[None, :], dB, mask=m_nt)
        tl.store(dC_ptr + part_rows + t[None, :], dC, mask=m_nt)
        carry = tl.sum(tl.where(offs_t[None, None, :] == 0, a * gh, 0.0), axis=2)

    tl.store(dh0_ptr + state_off, carry, mask=mask_dn)
    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)  # (B, D, N), summed over batch outside
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)


def _block_d(dim: int, n_pad: int, block_t: int, budget: int) -> int:
    cap = triton.next_power_of_2(max(dim, 1))
    return max(1, min(cap, budget // (n_pad * block_t)))


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"the 'triton' selective-scan backend needs CUDA tensors, got device {t.device}; "
            "on CPU use backend='chunked' (or set TRITON_INTERPRET=1 before importing this module "
            "to run the kernels in Triton's interpreter, for tests)"
        )


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, h0, block_t, block_d, block_d_bwd):
        batch, dim, length = u.shape
        nstate = A.shape[1]
        n_pad = triton.next_power_of_2(nstate)
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D = D.contiguous() if D is not None else None
        z = z.contiguous() if z is not None else None
        h0 = h0.contiguous() if h0 is not None else None
        n_tiles = triton.cdiv(length, block_t)
        block_d = block_d or _block_d(dim, n_pad, block_t, _FWD_TILE_BUDGET)
        y = torch.empty_like(u)
        last = torch.empty(batch, dim, nstate, device=u.device, dtype=torch.float32)
        ckpt = torch.empty(batch, dim, n_tiles, nstate, device=u.device, dtype=torch.float32)
        grid = (batch, triton.cdiv(dim, block_d))
        _fwd_kernel[grid](
            u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
            h0 if h0 is not None else last,
            y, last, ckpt,
            dim, length, nstate, n_tiles,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None,
            BLOCK_D=block_d, N_PAD=n_pad, BLOCK_T=block_t,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, ckpt)
        ctx.meta = (block_t, block_d_bwd, h0 is not None, h0.dtype if h0 is not None else None)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, D, z, ckpt = ctx.saved_tensors
        block_t, block_d, has_h0, h0_dtype = ctx.meta
        batch, dim, length = u.shape
        nstate = A.shape[1]
        n_pad = triton.next_power_of_2(nstate)
        n_tiles = ckpt.shape[2]
        block_d = block_d or _block_d(dim, n_pad, block_t, _BWD_TILE_BUDGET)
        n_dblocks = triton.cdiv(dim, block_d)
        if dy is None:
            dy = torch.zeros_like(u)
        dy = dy.contiguous()
        dlast = dlast.contiguous() if dlast is not None else None
        f32 = dict(device=u.device, dtype=torch.float32)
        du = torch.empty(batch, dim, length, **f32)
        ddelta = torch.empty(batch, dim, length, **f32)
        dz = torch.empty(batch, dim, length, **f32) if z is not None else None
        dA = torch.empty(batch, dim, nstate, **f32)
        dB = torch.empty(batch, n_dblocks, nstate, length, **f32)
        dC = torch.empty(batch, n_dblocks, nstate, length, **f32)
        dD = torch.empty(batch, dim, **f32) if D is not None else None
        dh0 = torch.empty(batch, dim, nstate, **f32)
        _bwd_kernel[(batch, n_dblocks)](
            u, delta, A, B, C, D if D is not None else u, z if z is not None else u, ckpt, dy,
            dlast if dlast is not None else dh0,
            du, ddelta, dz if dz is not None else du, dA, dB, dC, dD if dD is not None else dA, dh0,
            dim, length, nstate, n_tiles, n_dblocks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DLAST=dlast is not None,
            BLOCK_D=block_d, N_PAD=n_pad, BLOCK_T=block_t,
        )
        grads = (
            du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype),
            dB.sum(1).to(B.dtype), dC.sum(1).to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None,
            dz.to(z.dtype) if z is not None else None,
            dh0.to(h0_dtype) if has_h0 else None,
        )
        return (*grads, None, None, None)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    *,
    block_t: int = DEFAULT_BLOCK_T,
    block_d: int | None = None,
    block_d_bwd: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused scan; returns (y (B, D, L) in u's dtype, last state (B, D, N) in fp32).

    Differentiable in every tensor argument. ``block_t`` (a power of two) is both the time tile
    and the checkpoint interval; ``block_d`` / ``block_d_bwd`` override the channel tile of the
    forward / backward kernels (powers of two; default from a register budget).
    """
    _check_device(u)
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    for name, value in (("block_d", block_d), ("block_d_bwd", block_d_bwd)):
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two, got {value}")
    check_scan_shapes(u, delta, A, B, C, D, z, initial_state)
    batch, dim, length = u.shape
    nstate = A.shape[1]
    if length == 0:
        last = (initial_state.float() if initial_state is not None
                else u.new_zeros(batch, dim, nstate, dtype=torch.float32))
        return u.new_zeros(u.shape), last
    return _SelectiveScanFn.apply(u, delta, A, B, C, D, z, initial_state, block_t, block_d, block_d_bwd)
