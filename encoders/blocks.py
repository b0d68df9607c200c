"""Pre-norm residual blocks. The drop-path rate comes with each call (scheduled drop path)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import EncoderConfig
from .layers import Mlp, RMSNorm, drop_path
from .mixers import MIXERS


class TransformerBlock(nn.Module):
    """x + mixer(LN(x)), then x + MLP(LN(x)): for the vit and retnet mixers."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.block_norm_eps)
        self.mixer = MIXERS[cfg.mixer](cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.block_norm_eps)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, drop_rate: float = 0.0, cache: dict | None = None,
                offset: int = 0, **mixer_options) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``mixer_options`` go to the attention mixer (``output_attentions``, ``backend``); with
        ``output_attentions=True`` the block returns ``(x, attention probabilities)``."""
        mixed = self.mixer(self.norm1(x), cache=cache, offset=offset, **mixer_options)
        probs = None
        if mixer_options.get("output_attentions"):
            mixed, probs = mixed
        x = x + drop_path(mixed, drop_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), drop_rate, self.training)
        return x if probs is None else (x, probs)


class MambaBlock(nn.Module):
    """x + mixer(RMSNorm(x)), no MLP; the residual stream stays in float32 when asked."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.embed_dim, eps=cfg.block_norm_eps)
        self.mixer = MIXERS["mamba"](cfg)

    def forward(self, x: torch.Tensor, drop_rate: float = 0.0, cache: dict | None = None,
                offset: int = 0) -> torch.Tensor:
        if self.residual_in_fp32 and x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        out = self.mixer(self.norm(x), cache=cache, offset=offset)
        return x + drop_path(out, drop_rate, self.training).to(x.dtype)


def make_block(cfg: EncoderConfig) -> nn.Module:
    return MambaBlock(cfg) if cfg.mixer == "mamba" else TransformerBlock(cfg)
