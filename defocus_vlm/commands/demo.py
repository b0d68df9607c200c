"""Run the main job end to end on bundled data: stage 1 classification on Fashion-MNIST, stage 2 CLIP
alignment, stage 3 instruction tuning on easy-VQA with a small LLM, their evaluations, an over-focus
picture and a final table. Each step is printed as the ``defocus-vlm`` command it runs; finished steps
are reused unless --force. Stage 1 and stages 2-3 run side by side on a CPU with 2+ cores (--jobs).
About 6 minutes on 2 CPU cores (limit: 15); a GPU is used when present."""

from __future__ import annotations

import argparse

from defocus_vlm.cli_options import add_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_dir(parser, help="where every stage, result and figure goes (runs/demo)", required=False,
                   default="runs/demo")
    parser.add_argument("--force", action="store_true", help="re-run finished steps instead of reusing them")
    parser.add_argument("--fast", action="store_true",
                        help="two training steps per stage and small evaluations: checks the plumbing in ~2 min")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                        help="2: stage 1 and stages 2-3 side by side (default on a CPU with 2+ cores); 1: in order")


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.demo import run_demo

    run_demo(args.output_dir, force=args.force, fast=args.fast, jobs=args.jobs)
    return 0
