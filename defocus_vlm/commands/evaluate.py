"""Evaluate a model: ``defocus-vlm eval TASK --model DIR ...``.

Each task lives in its own module under ``defocus_vlm.eval`` exposing ``add_cli_arguments(parser)``
and ``run_cli(args) -> int``; ``defocus-vlm eval TASK --help`` lists that task's options. Results are
printed as JSON (and written where ``--output`` says)."""

from __future__ import annotations

import argparse
import importlib

# task -> (module under defocus_vlm.eval, one-line help)
TASKS: dict[str, tuple[str, str]] = {
    "classification": ("classification", "top-1/top-5 of an exported classifier on a labelled dataset"),
    "zeroshot": ("zeroshot", "zero-shot top-1/top-5 of a CLIP model with class-name prompts"),
    "retrieval": ("retrieval", "image->text and text->image R@1/5/10 of a CLIP model on image-text pairs"),
    "vqa": ("vqa", "VQA benchmarks (easy-VQA, VQAv2, TextVQA, GQA, POPE, ScienceQA, MMBench) of an exported VLM"),
    "vqa-samples": ("vqa_samples", "one PNG of sample questions with each model's answers, from eval vqa outputs"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, (module, help_text) in TASKS.items():
        mod = importlib.import_module(f"defocus_vlm.eval.{module}")
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().split("\n\n")[0])
        mod.add_cli_arguments(p)
        p.set_defaults(_task_run=mod.run_cli)


def run(args: argparse.Namespace) -> int:
    return int(args._task_run(args) or 0)
