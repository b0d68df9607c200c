"""The encoder: patch embedding (raster order) -> class token -> causal blocks -> final norm."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .band_pass import BandPassFilter
from .blocks import MambaBlock, make_block
from .config import EncoderConfig
from .layers import PatchEmbed, drop_path_rates, init_linear, pos_embed_for_grid
from .mixers import DefocusMambaMixer


class EncoderOutput(NamedTuple):
    """last_hidden_state (B, L, D) after the final norm; hidden_states: the embeddings and each block's
    output (``output_hidden_states``); attentions: each block's attention probabilities (B, H, L, L_keys)
    (``output_attentions``, vit mixer only)."""

    last_hidden_state: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None
    attentions: list[torch.Tensor] | None = None


@dataclass
class EncoderState:
    """What a causal encoder carries between chunks: one cache dict per block and the position."""

    caches: list[dict] = field(default_factory=list)
    position: int = 0


class DefocusEncoder(nn.Module):
    """``block_factory`` builds each block from ``cfg`` (default :func:`make_block`). The Hugging Face models pass
    one that builds the same blocks as transformers GradientCheckpointingLayers (same weights, same names), which
    checkpoint themselves when transformers switches them on; ``set_grad_checkpointing`` is timm's switch."""

    def __init__(self, cfg: EncoderConfig, block_factory: Callable[[EncoderConfig], nn.Module] = make_block):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.cls_position != "none" else None
        num_pos = cfg.grid_size[0] * cfg.grid_size[1] + (self.cls_token is not None)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, dim)) if cfg.pos_embed == "learned" else None
        self.blocks = nn.ModuleList(block_factory(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=cfg.final_norm_eps)
        self.grad_checkpointing = False
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Children before parents, as transformers' weight init goes: a mixer's own init (Mamba's dt_proj bias)
        # must come after the generic Linear init of its children, not be overwritten by it.
        self.apply(init_module)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay (timm's convention; the optimiser collects every module's)."""
        return {"cls_token", "pos_embed"}

    # ------------------------------------------------------------------ embedding
    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """One clear error for malformed input, before any work. The shape checks are static; the NaN check reads
        the data, so traced code (torch.export, torch.compile) skips it: it runs in eager calls only."""
        cfg = self.cfg
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}")
        _, chans, height, width = pixel_values.shape
        if chans != cfg.in_chans:
            raise ValueError(f"expected {cfg.in_chans} image channels, got {chans} (shape {tuple(pixel_values.shape)})")
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {cfg.patch_size}")
        if not torch.compiler.is_compiling() and not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values")

    def num_tokens(self, height: int | None = None, width: int | None = None) -> int:
        return self.cfg.num_tokens(height, width)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token sequence (B, L, D): patches in raster order with the class token placed."""
        self.check_pixels(pixel_values)
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        grid = (pixel_values.shape[-2] // self.cfg.patch_size, pixel_values.shape[-1] // self.cfg.patch_size)
        if self.pos_embed is not None:
            x = x + self._patch_pos_embed(grid)
        if self.cls_token is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            if self.pos_embed is not None:
                cls = cls + (self.pos_embed[:, :1] if self.cfg.cls_position == "start" else self.pos_embed[:, -1:])
            x = torch.cat([cls, x] if self.cfg.cls_position == "start" else [x, cls], dim=1)
        return x

    def _patch_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        if self.cls_token is not None:
            pos = pos[:, 1:] if self.cfg.cls_position == "start" else pos[:, :-1]
        return pos_embed_for_grid(pos, self.cfg.grid_size, grid)

    # ------------------------------------------------------------------ forward
    def forward_tokens(
        self,
        x: torch.Tensor,
        drop_path_rate: float | None = None,
        output_hidden_states: bool = False,
        state: EncoderState | None = None,
        output_attentions: bool = False,
        attn_backend: str = "auto",
    ) -> EncoderOutput:
        """Run the blocks and the final norm on embedded tokens (optionally continuing ``state``).

        output_attentions: also return each block's attention probabilities (vit mixer only: retention and
        the selective scan have none). attn_backend: the vit mixer's attention kernel (``defocus_attention``)."""
        if output_attentions and self.cfg.mixer != "vit":
            raise ValueError(f"output_attentions: the {self.cfg.mixer!r} mixer has no attention probabilities "
                             "(only mixer='vit' has a softmax over positions)")
        rate = self.cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        rates = drop_path_rates(rate, len(self.blocks))
        mixer_options = {"output_attentions": output_attentions, "backend": attn_backend} \
            if self.cfg.mixer == "vit" else {}
        hidden = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        offset = 0 if state is None else state.position
        if state is not None and not state.caches:
            state.caches = [{} for _ in self.blocks]
        recomputed = self.training and torch.is_grad_enabled()  # when checkpointing would recompute a block
        for i, block in enumerate(self.blocks):
            cache = None if state is None else state.caches[i]
            checkpointed = self.grad_checkpointing or getattr(block, "gradient_checkpointing", False)
            if cache is not None and recomputed and checkpointed:
                raise ValueError("gradient checkpointing recomputes blocks in the backward pass, which would write "
                                 "the streaming cache twice: stream under torch.no_grad() or in eval mode")
            if self.grad_checkpointing and recomputed:
                out = torch.utils.checkpoint.checkpoint(block, x, rates[i], use_reentrant=False, **mixer_options)
            else:  # blocks that are transformers GradientCheckpointingLayers checkpoint themselves when switched on
                out = block(x, rates[i], cache=cache, offset=offset, **mixer_options)
            if output_attentions:
                out, probs = out
                attentions.append(probs)
            x = out
            if hidden is not None:
                hidden.append(x)
        if state is not None:
            state.position += x.shape[1]
        return EncoderOutput(self.norm(x.to(self.norm.weight.dtype)), hidden, attentions)

    def forward(self, pixel_values: torch.Tensor, drop_path_rate: float | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                attn_backend: str = "auto") -> EncoderOutput:
        return self.forward_tokens(self.embed(pixel_values), drop_path_rate, output_hidden_states,
                                   output_attentions=output_attentions, attn_backend=attn_backend)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The class token's output (mean of tokens when there is no class token)."""
        pos = self.cfg.cls_position
        return tokens[:, -1] if pos == "end" else tokens[:, 0] if pos == "start" else tokens.mean(1)

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.cfg.cls_position
        return tokens[:, :-1] if pos == "end" else tokens[:, 1:] if pos == "start" else tokens

    # ------------------------------------------------------------------ streaming
    def check_layer(self, layer: int) -> None:
        """``layer`` as :meth:`stream` takes it: -1 (the output) or an index of ``hidden_states``."""
        depth = len(self.blocks)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(depth + 1) <= layer <= depth:
            raise ValueError(f"layer must be an integer in [{-(depth + 1)}, {depth}] for an encoder of depth {depth}, "
                             f"got {layer!r}")

    def stream(self, pixel_values: torch.Tensor, chunk_size: int, layer: int = -1) -> Iterator[torch.Tensor]:
        """Yield the tokens of ``layer`` chunk by chunk; their concatenation equals the one-shot forward's.

        layer: -1 (default) the output, ``last_hidden_state`` after the final norm; any other value indexes
        ``hidden_states`` as ``forward(output_hidden_states=True)`` returns them (0 = the embeddings, k = the output
        of block k, negative values count from the end)."""
        if not self.cfg.causal:
            raise ValueError("streaming needs a causal encoder; this one is non-causal (causal=False)")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.check_layer(layer)
        return self._stream_chunks(self.embed(pixel_values), chunk_size, layer)  # errors above are raised at call time

    def _stream_chunks(self, tokens: torch.Tensor, chunk_size: int, layer: int) -> Iterator[torch.Tensor]:
        state = EncoderState()
        for start in range(0, tokens.shape[1], chunk_size):
            out = self.forward_tokens(tokens[:, start:start + chunk_size], state=state,
                                      output_hidden_states=layer != -1)
            yield out.last_hidden_state if layer == -1 else out.hidden_states[layer]


def init_module(module: nn.Module) -> None:
    """Initialise one module (used at construction and by Hugging Face's weight init)."""
    init_linear(module)
    if isinstance(module, DefocusMambaMixer):
        module.reset_mamba_parameters()
    elif isinstance(module, BandPassFilter):
        module.reset_parameters()
    elif isinstance(module, DefocusEncoder):
        if module.cls_token is not None:
            nn.init.trunc_normal_(module.cls_token, std=0.02)
        if module.pos_embed is not None:
            nn.init.trunc_normal_(module.pos_embed, std=0.02)


__all__ = ["DefocusEncoder", "EncoderOutput", "EncoderState", "MambaBlock", "init_module"]
