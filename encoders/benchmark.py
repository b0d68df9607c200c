"""Encoder benchmarks: throughput and memory of the Small presets beside timm's DeiT-S, and
the cost of one streaming step at an early and a late position."""

from __future__ import annotations

from collections.abc import Callable

import torch
from defocus_vlm.kernels.benchmark import time_call

from .config import EncoderConfig
from .model import DefocusEncoder, EncoderState
from .presets import get_preset

SMALL_PRESETS = ["defocus_vit_small", "defocus_retnet_small", "defocus_mamba_small",
                 "causal_vit_small", "causal_mamba_small", "vit_small"]


def build(name: str, img_size: int) -> torch.nn.Module:
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, img_size=img_size)
    values = {k: v for k, v in get_preset(name).items() if k in EncoderConfig.field_names()}
    return DefocusEncoder(EncoderConfig(**values, img_size=img_size))


def step_time(encoder: DefocusEncoder, position: int, device: torch.device, repeats: int) -> float:
    """Median ms of a one-token step after ``position`` tokens have been streamed."""
    dim = encoder.cfg.embed_dim
    state = EncoderState()
    with torch.no_grad():
        for start in range(0, position, 512):
            encoder.forward_tokens(torch.randn(1, min(512, position - start), dim, device=device), state=state)
        token = torch.randn(1, 1, dim, device=device)
        ms, _ = time_call(lambda: encoder.forward_tokens(token, state=state)[0], False, device, repeats, warmup=2)
    return ms


def run_encoder_benchmarks(device: str = "cpu", batch_size: int = 8, img_size: int = 224,
                           presets: list[str] | None = None, repeats: int = 3,
                           stream_positions: list[int] | None = None,
                           progress: Callable[[str], None] | None = None) -> dict:
    dev = torch.device(device)
    rows = []
    for name in (presets or SMALL_PRESETS) + ["timm:deit_small_patch16_224"]:
        model = build(name, img_size).to(dev)
        pixels = torch.randn(batch_size, 3, img_size, img_size, device=dev)
        row: dict = {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
        fwd = lambda m=model, x=pixels: m(x)[0] if isinstance(m, DefocusEncoder) else m(x)  # noqa: E731
        if progress:
            progress(f"{name}: forward")
        model.eval()
        with torch.no_grad():
            ms, mem = time_call(fwd, False, dev, repeats)
        row |= {"fwd_img_per_s": round(batch_size / ms * 1e3, 2), "fwd_mem_mb": round(mem, 1)}
        if progress:
            progress(f"{name}: train step")
        model.train()
        ms, mem = time_call(fwd, True, dev, repeats)
        row |= {"train_img_per_s": round(batch_size / ms * 1e3, 2), "train_mem_mb": round(mem, 1)}
        if isinstance(model, DefocusEncoder) and model.cfg.causal:
            model.eval()
            for pos in stream_positions or [16, 4096]:
                if progress:
                    progress(f"{name}: streaming step at token {pos}")
                row[f"stream_step_ms_at_{pos}"] = round(step_time(model, pos, dev, repeats * 3), 3)
        rows.append(row)
    return {"device": str(dev), "batch_size": batch_size, "img_size": img_size, "torch": torch.__version__,
            "memory": "peak allocated (CUDA)" if dev.type == "cuda" else "bytes saved for backward (CPU)",
            "rows": rows}
