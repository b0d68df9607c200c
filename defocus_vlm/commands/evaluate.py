"""Evaluate a model: ``defocus-vlm eval classification --model DIR --data PATH [--split val]``.

Prints JSON with top-1 / top-5 (for the EMA and the raw weights when the export holds both).
DATA is a Fashion-MNIST IDX directory, an image folder (PATH/<split>/<class>/<image>) or a
``datasets`` directory with image and label columns."""

from __future__ import annotations

import argparse

TASKS = {"classification": "defocus_vlm.eval.classification"}  # later: zeroshot, retrieval, vqa


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=sorted(TASKS), help="what to evaluate")
    parser.add_argument("--model", required=True, help="exported HF model directory")
    parser.add_argument("--data", required=True, help="dataset path")
    parser.add_argument("--split", default="val", help="split (default: val)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--source", default="auto", choices=["auto", "fashion_mnist", "imagefolder", "hf"])
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N samples")
    parser.add_argument("--output", default=None, help="also write the JSON here")


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.eval.classification import run_classification_eval, write_json

    results = run_classification_eval(
        args.model,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        source=args.source,
        image_column=args.image_column,
        label_column=args.label_column,
        limit=args.limit,
    )
    print(write_json(results, args.output))
    return 0
