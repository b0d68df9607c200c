"""Section ``streaming``: what streaming costs on a GPU.

- The encoders' one-token streaming step after 16 and after 4096 tokens (defocus_vlm/bench/encoders.py's
  ``stream_step_times``): a causal encoder with a bounded state should not slow down as the image
  grows (goal: step at 4096 <= 1.2x step at 16). ViT's KV cache grows, so it is the one at risk.
- The VLM's time to first token after the last patch of a 4096-patch image, one shot vs streamed
  (defocus_vlm/bench/stream.py): streaming should answer sooner and give the same first token."""

from __future__ import annotations

import torch

from defocus_vlm.bench.encoders import build, stream_step_times
from defocus_vlm.bench.stream import run_stream_benchmark

from .context import Outcome, SectionContext
from .report import Goal

ENCODERS = ("defocus_vit_small", "defocus_retnet_small", "defocus_mamba_small")
STEP_GOAL = Goal("<=", 1.2, "x the step at token 16")
POSITIONS, DRY_POSITIONS = (16, 4096), (16, 64)
DRY_ENCODER = dict(embed_dim=64, depth=2, num_heads=2, d_state=8, dt_rank=8, group_norm_size=16)
# VLM: a Small encoder at full depth with the tiny random Llama (no LM weights travel to the device)
VLM = dict(lengths=[4096], chunk_size=256, llm="tiny-llama", vision_preset="defocus_vit_small", vision_depth=None,
           repeats=3)
DRY_VLM = dict(lengths=[16], chunk_size=4, llm="tiny-llama", vision_preset="defocus_vit_tiny", vision_depth=2,
               repeats=1)


def _encoder_row(preset: str, ctx: SectionContext) -> Outcome:
    positions = list(DRY_POSITIONS if ctx.dry_run else POSITIONS)
    model = build(preset, 224, **(DRY_ENCODER if ctx.dry_run else {})).to(ctx.device).eval()
    times = stream_step_times(model, positions, ctx.device, repeats=3 if ctx.dry_run else 20)
    early, late = times[positions[0]], times[positions[-1]]
    ratio = late / early
    value = f"{ratio:.2f}x ({late:.3g} ms at token {positions[-1]} vs {early:.3g} ms at {positions[0]})"
    return Outcome(value, ctx.judge(ratio, STEP_GOAL), {"step_ms": times, "ratio": ratio})


def _vlm_row(ctx: SectionContext) -> Outcome:
    opts = DRY_VLM if ctx.dry_run else VLM
    result = run_stream_benchmark(str(ctx.device), **opts)
    row = result["rows"][0]
    ok = row["speedup"] > 1.0 and row["same_first_token"]
    value = (f"one shot {row['oneshot_ttft_ms']:.3g} ms, streamed {row['stream_ttft_ms']:.3g} ms "
             f"({row['speedup']:.2f}x), same first token: {row['same_first_token']}")
    return Outcome(value, ctx.verdict(ok), {k: v for k, v in result.items() if k != "device"})


def run(ctx: SectionContext) -> None:
    patches = (DRY_VLM if ctx.dry_run else VLM)["lengths"][0]
    steps = {p: f"{p} streaming step: token {(DRY_POSITIONS if ctx.dry_run else POSITIONS)[-1]} vs 16"
             for p in ENCODERS}
    vlm_name = f"VLM first token after the last patch, {patches} patches: streamed vs one shot"
    ctx.plan([*steps.values(), vlm_name])
    for preset, name in steps.items():
        ctx.check(name, str(STEP_GOAL), lambda p=preset: _encoder_row(p, ctx), min_seconds=5 if ctx.cuda else 0)
        if ctx.cuda:
            torch.cuda.empty_cache()
    ctx.check(vlm_name, "streamed sooner (> 1x), same first token", lambda: _vlm_row(ctx),
              min_seconds=10 if ctx.cuda else 0)
