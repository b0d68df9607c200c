"""Convert an official De-focus Mamba checkpoint (.pth with 'model' / 'model_ema') into a
Hugging Face directory loadable with AutoModelForImageClassification. Sizes are read from the
tensors; a wrong or truncated checkpoint gets one error naming the key and the shapes."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official checkpoint (.pth)")
    parser.add_argument("out_dir", help="output directory (Hugging Face format, safetensors)")
    parser.add_argument("--ema", action="store_true", help="convert the 'model_ema' weights instead of 'model'")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution (default 224)")
    parser.add_argument("--rope-scale-factor", type=float, default=1.0,
                        help="RoPE index divisor for other resolutions (token-count ratio; default 1)")
    parser.add_argument("--delta-scale-factor", type=float, default=1.0,
                        help="Delta divisor for other resolutions (side-length ratio; default 1)")


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.convert_official import convert

    model = convert(args.checkpoint, args.out_dir, ema=args.ema, img_size=args.img_size,
                    rope_scale_factor=args.rope_scale_factor, delta_scale_factor=args.delta_scale_factor)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint} -> {args.out_dir} ({n / 1e6:.2f}M parameters, "
          f"{model.config.depth} blocks, width {model.config.embed_dim})")
    return 0
