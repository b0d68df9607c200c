"""Over-focus diagnostics: ``defocus-vlm analyze --model M [--model M ...] --image IMG [--image ...]
[--layers 3 6 9 11] --output-dir DIR``.

MODEL is an exported classifier directory, or a preset name for seeded random weights, optionally
with overrides (``defocus_vit_tiny:img_size=28,patch_size=4,in_chans=1``). IMAGE is an image file or
``fashion-mnist:N`` (test image N of the Fashion-MNIST IDX files). Layers are block indices (0-based,
negative from the end); by default the paper's (3/6/9/11 of 12 blocks, 6/12/18/22 of 24).

Writes to DIR, per image, ``*_attention.png``, ``*_receptive_field.png`` and ``*_gradient.png``
(rows: models, columns: layers), ``summary.png`` (the metrics against the layer) and
``metrics.json``. Definitions: ``defocus_vlm.eval.focus``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from defocus_vlm.cli_options import add_device, add_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="MODEL",
                        help="exported classifier directory or PRESET[:key=value,...] (repeatable)")
    parser.add_argument("--image", action="append", required=True, metavar="IMAGE",
                        help="image file or fashion-mnist:N (repeatable)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="block indices (default: the paper's)")
    add_output_dir(parser, help="output directory for the figures and metrics.json")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--rows-per-pass", type=int, default=None,
                        help="attention-map rows vectorised per backward pass (default: 1 on CPU, 32 on CUDA)")
    add_device(parser)


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.inference import resolve_device

    try:
        import matplotlib  # noqa: F401 - checked before any work
    except ImportError as err:
        raise ValueError("the figures need matplotlib: pip install 'defocus-vlm[eval]'") from err
    from defocus_vlm.eval.focus import analyze, report
    from defocus_vlm.eval.focus_plots import save_figures

    start = time.perf_counter()
    results, images = analyze(args.model, args.image, args.layers, batch_size=args.batch_size,
                              rows_per_pass=args.rows_per_pass, device=str(resolve_device(args.device)),
                              progress=True)
    out = Path(args.output_dir)
    written = save_figures(results, images, out)
    metrics = report(results, images)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for path in [*written, out / "metrics.json"]:
        print(path)
    for name, model in metrics["models"].items():
        for layer, values in model["layers"].items():
            shown = "  ".join(f"{k}={v:.3f}" for k, v in values.items() if k != "per_image")
            print(f"{name}  layer {layer}: {shown}")
    print(f"done in {metrics['seconds']:.1f}s")
    return 0
