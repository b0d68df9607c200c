"""The paper's learnable band-pass filter for attention-like mixers (vit, retnet).

Each head h gets a decay lambda_h = -exp(lambda_hat_h) on token distance and a set of
rotary frequencies theta_h: together, the frequency response of exp(lambda t) exp(i theta t)
is a band-pass centred on theta with width |lambda|. "fixed" keeps the initial values as
buffers, "learnable" trains them, "none" drops the term.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from defocus_vlm.kernels.rope import apply_rope_tied

from .layers import retnet_decay_init, rope_inv_freq


def _register(module: nn.Module, name: str, value: torch.Tensor, mode: str) -> None:
    if mode == "learnable":
        module.register_parameter(name, nn.Parameter(value))
    elif mode == "fixed":
        module.register_buffer(name, value)
    else:
        setattr(module, name, None)


class BandPassFilter(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, decay: str, rope: str, rope_base: float):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_base = num_heads, head_dim, rope_base
        decay_init, freq_init = self._initial()
        # stored as log(-lambda) so that lambda = -exp(.) stays negative while training
        _register(self, "decay_log", decay_init, decay)
        _register(self, "rope_freq", freq_init, rope)

    def _initial(self) -> tuple[torch.Tensor, torch.Tensor]:
        decay = torch.log(-retnet_decay_init(self.num_heads))
        freqs = rope_inv_freq(self.head_dim, self.rope_base).repeat(self.num_heads, 1)  # (H, head_dim/2)
        return decay, freqs

    @torch.no_grad()
    def reset_parameters(self) -> None:
        decay, freqs = self._initial()
        for tensor, value in ((self.decay_log, decay), (self.rope_freq, freqs)):
            if tensor is not None:
                tensor.copy_(value)

    def no_weight_decay(self) -> set[str]:
        """The decay and the RoPE frequencies are not weights to shrink (see DefocusEncoder.no_weight_decay)."""
        return {"decay_log", "rope_freq"}

    def log_decay(self) -> torch.Tensor | None:
        """lambda_h (H,), all negative; None when decay is off."""
        return None if self.decay_log is None else -torch.exp(self.decay_log)

    def rotate(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Apply RoPE to x (..., H, L, head_dim) at absolute positions offset..offset+L-1 (q and k may come
        stacked in one tensor: one rotation for both)."""
        if self.rope_freq is None:
            return x
        # angles in float32 at least: in bf16, position * frequency near 200 rad is off by up to 0.5 rad
        freq = self.rope_freq
        if freq.dtype in (torch.float16, torch.bfloat16):
            freq = freq.float()
        pos = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=freq.dtype)
        return apply_rope_tied(x, pos[None, :, None] * freq[:, None, :])  # pairs share a frequency
