"""Encoder benchmarks (``defocus-vlm bench encoders``): throughput and memory of the Small presets
beside timm's DeiT-S, and the cost of one streaming step at an early and a late position."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from defocus_vlm.encoders.config import EncoderConfig
from defocus_vlm.encoders.model import DefocusEncoder, EncoderState
from defocus_vlm.encoders.presets import get_preset
from defocus_vlm.kernels.dispatch import ENV_VAR

from .timing import time_call

SMALL_PRESETS = ["defocus_vit_small", "defocus_retnet_small", "defocus_mamba_small",
                 "causal_vit_small", "causal_mamba_small", "vit_small"]


def build(name: str, img_size: int, **overrides) -> torch.nn.Module:
    """A timm model (``timm:NAME``) or a preset's encoder; ``overrides`` change preset fields."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, img_size=img_size, **overrides)
    values = {k: v for k, v in get_preset(name).items() if k in EncoderConfig.field_names()}
    return DefocusEncoder(EncoderConfig(**(values | overrides), img_size=img_size))


@contextlib.contextmanager
def kernel_backends(value: str | None) -> Iterator[None]:
    """Run the block with ``DEFOCUS_KERNELS=value`` (None: unset), restoring the previous value."""
    old = os.environ.pop(ENV_VAR, None)
    if value is not None:
        os.environ[ENV_VAR] = value
    try:
        yield
    finally:
        os.environ.pop(ENV_VAR, None)
        if old is not None:
            os.environ[ENV_VAR] = old


def stream_step_times(encoder: DefocusEncoder, positions: list[int], device: torch.device,
                      repeats: int) -> dict[int, float]:
    """Fastest ms of a one-token streaming step after each of ``positions`` tokens. The positions are
    timed in turn, step after step, so a busy machine slows them alike."""
    dim = encoder.cfg.embed_dim
    states = {}
    with torch.no_grad():
        for position in positions:
            states[position] = EncoderState()
            for start in range(0, position, 512):
                chunk = torch.randn(1, min(512, position - start), dim, device=device)
                encoder.forward_tokens(chunk, state=states[position])
        token = torch.randn(1, 1, dim, device=device)
        times: dict[int, list[float]] = {p: [] for p in positions}
        for _ in range(repeats):
            for position in positions:
                step = lambda s=states[position]: encoder.forward_tokens(token, state=s)[0]  # noqa: E731
                times[position].append(time_call(step, False, device, 1, warmup=0)[0])
    return {p: min(t) for p, t in times.items()}


def run_encoder_benchmarks(device: str = "cpu", batch_size: int = 8, img_size: int = 224,
                           presets: list[str] | None = None, repeats: int = 3,
                           stream_positions: list[int] | None = None,
                           progress: Callable[[str], None] | None = None,
                           compare_reference: bool = False) -> dict:
    """``compare_reference``: also time each preset's forward with every op on its reference backend
    (``DEFOCUS_KERNELS=reference``), interleaved with the automatic choice, and report the ratio."""
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
        with torch.no_grad(), kernel_backends(None):
            ms, mem = time_call(fwd, False, dev, repeats)
        row |= {"fwd_img_per_s": round(batch_size / ms * 1e3, 2), "fwd_mem_mb": round(mem, 1)}
        if compare_reference and isinstance(model, DefocusEncoder):
            if progress:
                progress(f"{name}: forward, reference kernels vs automatic (interleaved)")
            with torch.no_grad():
                auto_ms, ref_ms = [], []
                for _ in range(repeats):  # interleaved, so a busy machine slows both alike
                    with kernel_backends(None):
                        auto_ms.append(time_call(fwd, False, dev, 1)[0])
                    with kernel_backends("reference"):
                        ref_ms.append(time_call(fwd, False, dev, 1)[0])
            row |= {"fwd_img_per_s_reference": round(batch_size / min(ref_ms) * 1e3, 2),
                    "fwd_speedup_auto_vs_reference": round(min(ref_ms) / min(auto_ms), 3)}
        if progress:
            progress(f"{name}: train step")
        model.train()
        ms, mem = time_call(fwd, True, dev, repeats)
        row |= {"train_img_per_s": round(batch_size / ms * 1e3, 2), "train_mem_mb": round(mem, 1)}
        if isinstance(model, DefocusEncoder) and model.cfg.causal:
            model.eval()
            positions = stream_positions or [16, 4096]
            if progress:
                progress(f"{name}: streaming step at tokens {positions}")
            for pos, ms in stream_step_times(model, positions, dev, max(repeats * 5, 10)).items():
                row[f"stream_step_ms_at_{pos}"] = round(ms, 3)
        rows.append(row)
    return {"device": str(dev), "batch_size": batch_size, "img_size": img_size, "torch": torch.__version__,
            "memory": "peak allocated (CUDA)" if dev.type == "cuda" else "bytes saved for backward (CPU)",
            "rows": rows}
