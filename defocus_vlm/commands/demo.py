"""Run the main job end to end on bundled data: the chain on one De-focus ViT over easy-VQA's images
(stage 1 classification on their colour-shape classes -> stage 2 CLIP alignment from that tower ->
stage 3 instruction tuning of a VLM on that tower), beside Fashion-MNIST classification; their
evaluations, an over-focus picture and a final table naming the checkpoint each stage started from.
Each step is printed as the ``defocus-vlm`` command it runs; finished steps are reused unless --force.
The two lanes run side by side on a CPU with 2+ cores (--jobs). Goal: 15 minutes on 2 CPU cores
(README "The demo" has the measured time); a GPU is used when present."""

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
                        help="2: the Fashion-MNIST lane and the easy-VQA chain side by side (default on a CPU "
                             "with 2+ cores); 1: in order")


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.demo import run_demo

    run_demo(args.output_dir, force=args.force, fast=args.fast, jobs=args.jobs)
    return 0
