"""Run the main job on bundled data. For now: build a De-focus preset, encode scikit-image's
bundled photos (all tokens, and streamed chunk by chunk to show the causal encoder), and
classify them with the 1000-class head. The weights are random unless --model is given,
so the classes only show the plumbing."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="defocus_mamba_small", help="preset to build (default defocus_mamba_small)")
    parser.add_argument("--model", default=None, help="an HF directory to use instead of a random preset")
    parser.add_argument("--chunk-size", type=int, default=64, help="tokens per streamed chunk (default 64)")


def bundled_photos() -> dict:
    from skimage import data

    return {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}


def run(args: argparse.Namespace) -> int:
    import torch

    from defocus_vlm import DefocusImageProcessor, DefocusVisionConfig, DefocusVisionForImageClassification

    torch.manual_seed(0)
    if args.model:
        model = DefocusVisionForImageClassification.from_pretrained(args.model)
        processor = DefocusImageProcessor.from_pretrained(args.model)
    else:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        labels = {i: info.index_to_description(i) for i in range(1000)}
        model = DefocusVisionForImageClassification(DefocusVisionConfig.from_preset(args.preset, id2label=labels))
        processor = DefocusImageProcessor(size=model.config.img_size)
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model or args.preset} ({n / 1e6:.2f}M parameters, mixer={model.config.mixer}, "
          f"causal={model.config.causal})")
    photos = bundled_photos()
    pixels = processor(list(photos.values()))["pixel_values"]
    print(f"pixel_values: {tuple(pixels.shape)}")
    with torch.no_grad():
        start = time.perf_counter()
        out = model.defocus(pixels)
        elapsed = time.perf_counter() - start
        print(f"last_hidden_state: {tuple(out.last_hidden_state.shape)} (patches in raster order, class token last)"
              f" in {elapsed:.2f}s")
        if model.config.causal:
            chunks = list(model.defocus.stream(pixels, args.chunk_size))
            streamed = torch.cat(chunks, dim=1)
            diff = (streamed - out.last_hidden_state).abs().max().item()
            print(f"streamed in {len(chunks)} chunks of <= {args.chunk_size} tokens: "
                  f"max |streamed - one-shot| = {diff:.2e}")
        probs = model(pixels).logits.softmax(-1)
    top = probs.topk(3, dim=-1)
    for name, p, idx in zip(photos, top.values, top.indices):
        shown = ", ".join(f"{model.config.id2label[int(i)]} ({float(q):.3f})" for q, i in zip(p, idx))
        print(f"{name:>10}: {shown}")
    if not args.model:
        print("(random weights: the classes above only show the plumbing; pass --model DIR for a trained model)")
    return 0
