"""Token mixers. Each takes (B, L, D) and an optional per-layer ``cache`` dict, which it reads
and updates in place so that a sequence can be fed in chunks (streaming); ``offset`` is the
absolute position of the chunk's first token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from defocus_vlm.kernels import causal_conv1d, defocus_attention, gated_group_rms_norm, retention, selective_scan
from defocus_vlm.kernels.attention import attention_probabilities
from defocus_vlm.kernels.rope import apply_rope, rope_angles

from .band_pass import BandPassFilter
from .config import EncoderConfig
from .layers import inverse_softplus


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class DefocusAttention(nn.Module):
    """Softmax attention with the band-pass filter: RoPE on q, k and a per-head distance decay."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.causal = cfg.causal
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.filter = BandPassFilter(cfg.num_heads, self.head_dim, cfg.decay, cfg.rope, cfg.rope_base)

    def forward(self, x: torch.Tensor, cache: dict | None = None, offset: int = 0, output_attentions: bool = False,
                backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """backend: the attention kernel (``defocus_attention``'s ``backend``). output_attentions: also return
        the probabilities (B, H, L, L_keys), computed on the reference path (the fused kernels never form them)."""
        b, length, dim = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        (q, k), v = self.filter.rotate(qkv[:2], offset), qkv[2]  # q and k in one rotation
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        log_decay, q_offset = self.filter.log_decay(), k.shape[2] - length
        if output_attentions:
            probs = attention_probabilities(q, k, log_decay, causal=self.causal, q_offset=q_offset)
            out = probs @ v
        else:
            out = defocus_attention(q, k, v, log_decay, causal=self.causal, q_offset=q_offset, backend=backend)
        out = self.proj(out.transpose(1, 2).reshape(b, length, dim))
        return (out, probs) if output_attentions else out


class MultiScaleRetention(nn.Module):
    """RetNet retention: RoPE'd q, k, per-head decay, per-head group norm, swish gate."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.head_dim = dim // cfg.num_heads
        self.q_proj = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.g_proj = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.group_norm = nn.GroupNorm(cfg.num_heads, dim, eps=1e-6)
        self.filter = BandPassFilter(cfg.num_heads, self.head_dim, cfg.decay, cfg.rope, cfg.rope_base)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: dict | None = None, offset: int = 0) -> torch.Tensor:
        b, length, dim = x.shape
        q = self.filter.rotate(self._heads(self.q_proj(x)), offset)
        k = self.filter.rotate(self._heads(self.k_proj(x)), offset) / math.sqrt(self.head_dim)
        v = self._heads(self.v_proj(x))
        log_decay = self.filter.log_decay()
        if log_decay is None:  # no decay: gamma = 1, a plain cumulative (linear-attention) sum
            log_decay = x.new_zeros(self.num_heads)
        state = None if cache is None else cache.get("state")
        out, state = retention(q, k, v, log_decay, state=state)
        if cache is not None:
            cache["state"] = state
        out = out.transpose(1, 2).reshape(b * length, dim)
        out = self.group_norm(out).view(b, length, dim)
        return self.out_proj(F.silu(self.g_proj(x)) * out)


class DefocusMambaMixer(nn.Module):
    """The official De-focus Mamba mixer (and, with group_norm_size=0 and rope='none', plain Mamba).

    in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> x_proj -> (dt, B, C);
    RoPE on B and C along the token index; Delta = softplus(dt_proj(dt)) / delta_scale_factor;
    selective scan; group RMS norm (no weight); + D * x; * SiLU(z); out_proj.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        dim, inner, n = cfg.embed_dim, cfg.d_inner, cfg.d_state
        self.d_inner, self.d_state, self.dt_rank = inner, n, cfg.dt_rank
        self.group_norm_size = cfg.group_norm_size
        self.rope_tied = cfg.rope_tied
        self.delta_scale_factor = cfg.delta_scale_factor
        self.rope_scale_factor = cfg.rope_scale_factor
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, cfg.d_conv, groups=inner, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(inner, cfg.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(cfg.dt_rank, inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        a_log, freq = self._initial_a_log_freq()
        if cfg.decay == "learnable":
            self.A_log = nn.Parameter(a_log)
        elif cfg.decay == "fixed":
            self.register_buffer("A_log", a_log)
        else:
            self.A_log = None  # no decay: A = 0
        self.D = nn.Parameter(torch.ones(inner))
        if cfg.rope == "learnable":
            self.freq = nn.Parameter(freq)
        elif cfg.rope == "fixed":
            self.register_buffer("freq", freq)
        else:
            self.freq = None
        self.reset_mamba_parameters()

    def _initial_a_log_freq(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.d_state
        k = torch.arange(1, n + 1, dtype=torch.float64)
        freq = (100.0 ** (-k / n) - 0.01) / 0.99  # official init, k = 1..N
        a = k.repeat(self.d_inner, 1)  # S4D-real: A[d, n] = -(n + 1)
        if self.rope_tied:  # one value per rotated pair (the pair's first element)
            freq, a = freq[0::2], a[:, 0::2]
        return torch.log(a).float(), freq.float()

    @torch.no_grad()
    def reset_mamba_parameters(self) -> None:
        """Mamba's special init (dt_proj, A_log, D, freq); Linear layers are initialised elsewhere."""
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), self.d_inner, dtype=torch.float64))
        self.dt_proj.bias.copy_(inverse_softplus(dt.clamp(min=1e-4)).float())
        a_log, freq = self._initial_a_log_freq()
        if self.A_log is not None:
            self.A_log.copy_(a_log)
        if self.freq is not None:
            self.freq.copy_(freq)
        self.D.fill_(1.0)

    def no_weight_decay(self) -> set[str]:
        """The state decay and the RoPE frequencies are not weights to shrink (see DefocusEncoder.no_weight_decay)."""
        return {"A_log", "freq"}

    def _pairwise(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(2, dim=-1) if self.rope_tied else t

    def decay_matrix(self) -> torch.Tensor:
        """A (d_inner, d_state), all <= 0."""
        if self.A_log is None:
            return self.D.new_zeros(self.d_inner, self.d_state)
        return -torch.exp(self._pairwise(_upcast(self.A_log)))

    def forward(self, x: torch.Tensor, cache: dict | None = None, offset: int = 0) -> torch.Tensor:
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        conv_state = None if cache is None else cache.get("conv")
        u, conv_state = causal_conv1d(u.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                      state=conv_state, activation="silu")
        dt, b_in, c_in = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.freq is not None:
            freq = self._pairwise(_upcast(self.freq))
            pos = torch.arange(offset, offset + length, device=x.device, dtype=freq.dtype)
            angles = rope_angles(pos / self.rope_scale_factor, freq)
            b_in, c_in = apply_rope(b_in, angles), apply_rope(c_in, angles)
        # Delta stays in float32 under bf16 (as in mamba-ssm, whose kernel adds dt_proj's bias and applies the
        # softplus in float32): the bias (-2.3 to -6.9) dwarfs W dt, so adding it before the bf16 rounding would
        # cost Delta ~0.6 % on average where rounding the product alone costs ~0.02 %.
        # Its softplus runs inside the scan (mamba-ssm's delta_softplus) unless Delta is rescaled after it.
        delta = _upcast(F.linear(dt, self.dt_proj.weight)) + _upcast(self.dt_proj.bias)
        softplus_in_scan = self.delta_scale_factor == 1.0
        if not softplus_in_scan:
            delta = F.softplus(delta) / self.delta_scale_factor
        gated_in_scan = not self.group_norm_size
        ssm_state = None if cache is None else cache.get("ssm")
        y, ssm_state = selective_scan(
            u, delta.transpose(1, 2), self.decay_matrix(), b_in.transpose(1, 2).contiguous(),
            c_in.transpose(1, 2).contiguous(),
            D=_upcast(self.D) if gated_in_scan else None,
            z=z.transpose(1, 2) if gated_in_scan else None,
            initial_state=ssm_state, return_last_state=True, delta_softplus=softplus_in_scan,
        )
        if cache is not None:
            cache["conv"], cache["ssm"] = conv_state, ssm_state
        if not gated_in_scan:
            y = gated_group_rms_norm(y, u, z.transpose(1, 2), self.D, self.group_norm_size)
        return self.out_proj(y.transpose(1, 2))


MIXERS = {"vit": DefocusAttention, "retnet": MultiScaleRetention, "mamba": DefocusMambaMixer}
