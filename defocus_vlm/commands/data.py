"""Prepare data sets: ``defocus-vlm data easy-vqa --output-dir DIR``, ``defocus-vlm data shapes-vqa
--output-dir DIR``.

easy-VQA is written as LLaVA JSON + images, with an image-folder copy for classification pretraining
(layout in :mod:`defocus_vlm.data.easy_vqa`); shapes-VQA is generated (:mod:`defocus_vlm.data.shapes_vqa`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from defocus_vlm.cli_options import add_output_dir
from defocus_vlm.data import easy_vqa, shapes_objects, shapes_vqa

# LLaVA-1.5's instruction for short-answer VQA (appended to every question, as in its training data)
from defocus_vlm.data.vqa import SHORT_ANSWER_PROMPT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    p = sub.add_parser("easy-vqa", help="easy-VQA (PyPI easy-vqa) as LLaVA JSON + images",
                       description=easy_vqa.__doc__.split("\n\n")[1])
    add_output_dir(p, help="output directory")
    p.add_argument("--instruction", default=SHORT_ANSWER_PROMPT,
                   help="text on its own line after each question ('' for none); default: LLaVA's short-answer prompt")
    p.add_argument("--group-by-image", action="store_true",
                   help="train.json: one multi-turn conversation per image instead of one record per question")
    p.add_argument("--balance-answers", action="store_true",
                   help="train.json: repeat records so that every question text has each of its answers equally "
                        "often (easy-VQA's 'is there a red shape?' is 'no' 7 times in 8; the model then answers "
                        "from that prior instead of the image). The test split is left as it is")
    p.add_argument("--limit", type=int, default=0, help="keep only the first N questions of each split (0 = all)")
    _add_shapes_vqa_arguments(sub)


def _add_shapes_vqa_arguments(sub: argparse._SubParsersAction) -> None:
    defaults = shapes_vqa.ShapesVQAConfig()
    p = sub.add_parser("shapes-vqa", help="shapes-VQA: generated scenes, questions that need the whole image",
                       description=shapes_vqa.__doc__.split("\n\n")[0])
    add_output_dir(p, help="output directory")
    p.add_argument("--images", type=int, default=defaults.images, help="train scenes (default: %(default)s)")
    p.add_argument("--test-images", type=int, default=defaults.test_images,
                   help="scenes of test and of test_unseen each (default: a tenth of --images)")
    p.add_argument("--questions-per-image", type=int, default=defaults.questions_per_image,
                   help="questions per scene on average (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=defaults.img_size,
                   help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="the same seed writes the same data (default: %(default)s)")
    p.add_argument("--overlap", choices=shapes_vqa.OVERLAP_RULES, default=defaults.overlap,
                   help="none: shapes 2 px apart; partial: shapes may overlap but no centre is covered")
    p.add_argument("--background", choices=shapes_vqa.BACKGROUNDS, default=defaults.background,
                   help="plain, textured (checker or stripes) or mixed (a third each); the shapes stay the same")
    p.add_argument("--objects", action="store_true",
                   help="also write DIR/objects/{train,val}/<colour>_<shape>_<size>/: each scene's objects one per "
                        "image, a classification set for stage 1 (defocus_vlm.data.shapes_objects)")
    p.add_argument("--blank", action="store_true",
                   help="also write DIR/blank/: a plain grey canvas under every image's name, for a blind baseline")
    p.add_argument("--instruction", default=SHORT_ANSWER_PROMPT,
                   help="text on its own line after each question ('' for none); default: LLaVA's short-answer prompt")


def run_shapes_vqa(args: argparse.Namespace) -> int:
    config = shapes_vqa.ShapesVQAConfig(
        seed=args.seed, images=args.images, test_images=args.test_images, questions_per_image=args.questions_per_image,
        img_size=args.img_size, overlap=args.overlap, background=args.background,
    )
    start = time.perf_counter()
    summary = shapes_vqa.write_shapes_vqa(args.output_dir, config, args.instruction)
    if args.objects:
        summary["objects"] = shapes_objects.write_objects(args.output_dir, config)
    if args.blank:
        summary["blank"] = shapes_objects.write_blank(args.output_dir, config)
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 1)}), file=sys.stdout)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.dataset == "shapes-vqa":
        return run_shapes_vqa(args)
    counts = easy_vqa.export(args.output_dir, args.instruction, args.group_by_image, args.limit, args.balance_answers)
    print(json.dumps({"output_dir": str(args.output_dir), "records": counts}), file=sys.stdout)
    return 0
