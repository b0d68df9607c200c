"""Convert an official De-focus Mamba checkpoint (.pth with 'model' / 'model_ema') into a
Hugging Face directory loadable with AutoModelForImageClassification. Sizes are read from the
tensors; the input size, resolution-transfer factors, group norm size and head type from the
training config a full official checkpoint carries (flags override it). The EMA weights are taken
when present. A wrong or truncated checkpoint gets one error naming the key and the shapes;
docs/official_checkpoints.md lists the flags each released file needs."""

from __future__ import annotations

import argparse

from defocus_vlm.cli_options import add_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official checkpoint (.pth)")
    # the output directory used to be a second positional argument: still accepted, not advertised
    parser.add_argument("positional_output_dir", nargs="?", default=None, help=argparse.SUPPRESS)
    add_output_dir(parser, help="output directory (Hugging Face format, safetensors)", required=False)
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="ema", action="store_const", const=True, default=None,
                         help="require the 'model_ema' weights (the default takes them when present)")
    weights.add_argument("--raw", dest="ema", action="store_const", const=False,
                         help="convert 'model' (the raw weights) even when 'model_ema' is present")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input resolution (default: the checkpoint's training config, else 224)")
    parser.add_argument("--rope-scale-factor", type=float, default=None,
                        help="RoPE index divisor for other resolutions (token-count ratio; default: the "
                             "checkpoint's training config, else 1)")
    parser.add_argument("--delta-scale-factor", type=float, default=None,
                        help="Delta divisor for other resolutions (side-length ratio; default: the "
                             "checkpoint's training config, else 1)")


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.convert_official import convert

    if (args.output_dir is None) == (args.positional_output_dir is None):
        raise ValueError("give the output directory once: convert-official CHECKPOINT --output-dir DIR")
    out_dir = args.output_dir or args.positional_output_dir
    model = convert(args.checkpoint, out_dir, ema=args.ema, img_size=args.img_size,
                    rope_scale_factor=args.rope_scale_factor, delta_scale_factor=args.delta_scale_factor,
                    say=lambda message: print(f"note: {message}"))
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(f"converted {args.checkpoint} -> {out_dir} ({n / 1e6:.2f}M parameters, {cfg.depth} blocks, "
          f"width {cfg.embed_dim}, {cfg.img_size}px, delta/rope scale {cfg.delta_scale_factor:g}/"
          f"{cfg.rope_scale_factor:g})")
    return 0
