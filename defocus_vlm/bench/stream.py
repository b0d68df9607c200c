"""``defocus-vlm bench stream``: time to first token after the last patch of an image arrives,
streaming prefill vs one shot.

One shot has to encode the whole image and pre-fill the whole prompt once the last patch is
there. Streaming has already encoded and pre-filled every earlier chunk while the later patches
were arriving (assuming the compute keeps up with the arrival), so only the last chunk, the text
after the image and the first token remain. Both give the same first token (checked and reported).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from defocus_vlm.configuration_defocus import DefocusVisionConfig
from defocus_vlm.configuration_vlm import DefocusVLMConfig
from defocus_vlm.llm import load_llm, tiny_llama_config, tiny_mamba_config
from defocus_vlm.modeling_vlm import DefocusVLMForConditionalGeneration

from .timing import sync

TINY_LLMS = {"tiny-llama": tiny_llama_config, "tiny-mamba": tiny_mamba_config}
TEXT_TOKENS = 16  # prompt text before and after the image
IMAGE_TOKEN_ID = 0  # placeholder id; the random prompt text never uses it


def build_model(llm: str, vision_preset: str, vision_depth: int | None, img_size: int, patch_size: int,
                device: torch.device) -> DefocusVLMForConditionalGeneration:
    """A randomly initialised encoder (timing does not depend on the weights) with ``llm``: "tiny-llama",
    "tiny-mamba" (small random LMs) or any name/path :func:`defocus_vlm.llm.load_llm` understands."""
    overrides = {"img_size": img_size, "patch_size": patch_size}
    if vision_depth is not None:
        overrides["depth"] = vision_depth
    vision = DefocusVisionConfig.from_preset(vision_preset, **overrides)
    language_model = None
    if llm in TINY_LLMS:
        text_config = TINY_LLMS[llm](vocab_size=1024, hidden_size=256, num_hidden_layers=4)
    else:
        language_model = load_llm(llm)
        text_config = language_model.config
    model = DefocusVLMForConditionalGeneration(
        DefocusVLMConfig(vision_config=vision, text_config=text_config, image_token_id=IMAGE_TOKEN_ID))
    if language_model is not None:
        model.language_model.load_state_dict(language_model.state_dict())
    return model.to(device).eval()


def _prompt(model: DefocusVLMForConditionalGeneration, side: int, patch_size: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    image_tokens = model.config.num_image_tokens(side * patch_size, side * patch_size)
    vocab = model.config.text_config.vocab_size

    def text() -> torch.Tensor:
        return torch.randint(IMAGE_TOKEN_ID + 1, vocab, (1, TEXT_TOKENS), generator=generator)

    ids = torch.cat([text(), torch.full((1, image_tokens), IMAGE_TOKEN_ID), text()], dim=1)
    pixels = torch.randn(1, model.config.vision_config.in_chans, side * patch_size, side * patch_size,
                         generator=generator)
    return ids.to(device), pixels.to(device), image_tokens


def _time_oneshot(model, ids, pixels, device) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits[:, -1]
    logits.argmax(-1).tolist()  # the first token is known once it is on the host
    return (time.perf_counter() - start) * 1e3, logits


def _time_stream(model, ids, pixels, chunk_size, device) -> tuple[float, float, torch.Tensor]:
    """(ms after the last chunk's patches arrived, ms of the whole streamed prefill, last logits)."""
    marks: list[float] = []

    def mark(_position: int) -> None:
        sync(device)
        marks.append(time.perf_counter())

    sync(device)
    start = time.perf_counter()
    out = model.prefill_image_stream(ids, pixels, chunk_size, logits_to_keep=1, chunk_callback=mark)
    logits = out.logits[:, -1]
    logits.argmax(-1).tolist()
    end = time.perf_counter()
    last_patch_arrived = marks[-2] if len(marks) > 1 else start  # the last chunk starts after the one before it
    return (end - last_patch_arrived) * 1e3, (end - start) * 1e3, logits


def run_stream_benchmark(device: str = "cpu", lengths: list[int] | None = None, chunk_size: int = 256,
                         llm: str = "tiny-llama", vision_preset: str = "defocus_vit_tiny",
                         vision_depth: int | None = 4, patch_size: int = 16, repeats: int = 3,
                         progress: Callable[[str], None] | None = None) -> dict:
    """lengths: patches per image (square images, so perfect squares: 1024 = 32x32 patches)."""
    lengths = lengths or [1024, 4096]
    sides = [math.isqrt(n) for n in lengths]
    if any(side * side != n or n < 1 for side, n in zip(sides, lengths)):
        raise ValueError(f"lengths are patch counts of square images and must be perfect squares "
                         f"(e.g. 1024 = 32x32), got {lengths}")
    if chunk_size < 1 or repeats < 1:
        raise ValueError(f"chunk_size and repeats must be positive, got {chunk_size} and {repeats}")
    dev = torch.device(device)
    model = build_model(llm, vision_preset, vision_depth, max(sides) * patch_size, patch_size, dev)
    rows = []
    with torch.no_grad():
        for side, patches in zip(sides, lengths):
            ids, pixels, image_tokens = _prompt(model, side, patch_size, dev)
            if progress:
                progress(f"{patches} patches: one shot and streaming (chunk {chunk_size}), {repeats} repeats")
            _time_oneshot(model, ids, pixels, dev)  # warm-up
            oneshot, stream, total = [], [], []
            for _ in range(repeats):
                ms, oneshot_logits = _time_oneshot(model, ids, pixels, dev)
                oneshot.append(ms)
                after_last, whole, stream_logits = _time_stream(model, ids, pixels, chunk_size, dev)
                stream.append(after_last)
                total.append(whole)
            oneshot_ms, stream_ms = statistics.median(oneshot), statistics.median(stream)
            rows.append({
                "patches": patches, "image_tokens": image_tokens, "prompt_tokens": ids.shape[1],
                "oneshot_ttft_ms": round(oneshot_ms, 2), "stream_ttft_ms": round(stream_ms, 2),
                "speedup": round(oneshot_ms / stream_ms, 2),
                "stream_prefill_total_ms": round(statistics.median(total), 2),
                "same_first_token": bool((oneshot_logits.argmax(-1) == stream_logits.argmax(-1)).all()),
                "max_abs_logit_diff": float((oneshot_logits - stream_logits).abs().max()),
            })
    vision = model.config.vision_config
    return {"device": str(dev), "torch": torch.__version__, "chunk_size": chunk_size, "repeats": repeats,
            "vision": {"preset": vision_preset, "depth": vision.depth, "embed_dim": vision.embed_dim,
                       "patch_size": patch_size},
            "llm": {"name": llm, "model_type": model.config.text_config.model_type,
                    "hidden_size": model.config.text_config.hidden_size,
                    "layers": model.config.text_config.num_hidden_layers},
            "text_tokens_before_and_after_image": TEXT_TOKENS,
            "ttft": "ms from the last patch's arrival to the first token on the host (median)",
            "rows": rows}
