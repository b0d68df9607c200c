"""Classify images: ``defocus-vlm classify --model DIR IMAGE [IMAGE ...] [--top-k 5]``.

Prints the top-k labels with probabilities per image. Grey, palette, RGBA, CMYK and 16-bit
images are converted; unreadable or huge images are reported and skipped (exit status 1)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from defocus_vlm.cli_options import add_device

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported HF model directory")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    add_device(parser)


def class_names(config: PretrainedConfig) -> list[str]:
    """id2label, or ImageNet names for a 1000-class model whose labels are the defaults."""
    n = config.num_labels
    names = [str(config.id2label.get(i, config.id2label.get(str(i), i))) for i in range(n)]
    if n == 1000 and all(name in (f"LABEL_{i}", str(i)) for i, name in enumerate(names)):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        names = [info.index_to_description(i) for i in range(n)]
    return names


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import defocus_vlm  # noqa: F401 - registers the Auto classes
    from defocus_vlm.image_io import ImageError, load_image
    from defocus_vlm.inference import resolve_device
    from defocus_vlm.user_files import check_model_dir

    if args.top_k <= 0:
        raise ValueError(f"--top-k must be positive, got {args.top_k}")
    check_model_dir(args.model, "defocus_vision")
    device = resolve_device(args.device)
    model = AutoModelForImageClassification.from_pretrained(args.model).eval().to(device)
    processor = AutoImageProcessor.from_pretrained(args.model)
    names = class_names(model.config)
    k = min(args.top_k, len(names))
    failures = 0
    for path in args.images:
        try:
            pixels = processor(load_image(path), return_tensors="pt")["pixel_values"]
        except ImageError as err:
            print(f"{path}: error: {err}", file=sys.stderr)
            failures += 1
            continue
        with torch.no_grad():
            probs = model(pixel_values=pixels.to(device)).logits.float().softmax(-1)[0]
        top = torch.topk(probs, k)
        preds = [
            {"label": names[i], "index": int(i), "probability": round(float(p), 6)}
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        if args.json:
            print(json.dumps({"image": path, "predictions": preds}))
        else:
            print(path)
            for pred in preds:
                print(f"  {pred['probability']:.4f}  {pred['label']}")
    return 1 if failures else 0
