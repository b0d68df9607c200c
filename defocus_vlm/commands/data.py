"""Prepare data sets: ``defocus-vlm data easy-vqa --out DIR``, ``defocus-vlm data shapes-vqa --output-dir DIR``.

easy-VQA (PyPI ``easy-vqa``, MIT; 64x64 images with one coloured shape, 13 single-word answers) is
written in LLaVA's conversation format: ``DIR/train.json`` and ``DIR/test.json`` (one record per
question, the answer as the assistant turn, so the test split doubles as the evaluation set),
images under ``DIR/images/{train,test}/`` (record paths are relative to ``DIR/images``) and the
answer vocabulary in ``DIR/answers.txt``. ``DIR/classes/{train,val}/<colour>_<shape>/`` holds the
same images as an image-folder classification set (24 classes; an image whose colour or shape its
questions leave open is left out) for pretraining an encoder with ``train classification``.
``--group-by-image`` writes each training image once with
all of its questions as one multi-turn conversation (about 10 turns): a tenth of the image tokens,
but earlier answers give later ones away ("is there a red shape?" "yes" ... "what color is the
shape?"), so a model trained on it learns to read the conversation instead of the image and does
worse on single questions."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from defocus_vlm.data import shapes_vqa

# LLaVA-1.5's instruction for short-answer VQA (appended to every question, as in its training data)
from defocus_vlm.data.vqa import SHORT_ANSWER_PROMPT

SPLITS = ("train", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    p = sub.add_parser("easy-vqa", help="easy-VQA (PyPI easy-vqa) as LLaVA JSON + images",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--out", required=True, help="output directory")
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
    p.add_argument("--output-dir", "--out", dest="output_dir", required=True, help="output directory")
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
    p.add_argument("--instruction", default=SHORT_ANSWER_PROMPT,
                   help="text on its own line after each question ('' for none); default: LLaVA's short-answer prompt")


def _easy_vqa_split(split: str):
    try:
        import easy_vqa
    except ImportError as err:
        raise FileNotFoundError("easy-VQA needs the easy-vqa package: pip install easy-vqa "
                                "(or pip install 'defocus-vlm[train]')") from err
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return list(zip(questions, answers, image_ids)), paths, easy_vqa.get_answers()


def _turns(question: str, answer: str, instruction: str, with_image: bool) -> list[dict]:
    text = question + (f"\n{instruction}" if instruction else "")
    return [{"from": "human", "value": ("<image>\n" if with_image else "") + text}, {"from": "gpt", "value": answer}]


def _records(split: str, rows: list, instruction: str, group: bool) -> list[dict]:
    if not group:
        return [{"id": f"easy_vqa_{split}_{i}", "image": f"{split}/{image_id}.png",
                 "conversations": _turns(q, a, instruction, True)} for i, (q, a, image_id) in enumerate(rows)]
    by_image: dict[int, list] = {}
    for q, a, image_id in rows:
        by_image.setdefault(image_id, []).append((q, a))
    return [{"id": f"easy_vqa_{split}_image_{image_id}", "image": f"{split}/{image_id}.png",
             "conversations": [t for k, (q, a) in enumerate(qa) for t in _turns(q, a, instruction, k == 0)]}
            for image_id, qa in by_image.items()]


def _write_classes(root: Path, rows: list, image_dir: Path) -> None:
    """Image-folder layout ``root/<colour>_<shape>/<id>.png`` of the images whose colour and shape
    the questions pin down (``training.pairs.easy_vqa_phrases``)."""
    from defocus_vlm.data.pairs import easy_vqa_phrases, is_colour_and_shape

    phrases = easy_vqa_phrases(*zip(*rows)) if rows else {}
    for image_id, phrase in phrases.items():
        if is_colour_and_shape(phrase):
            folder = root / phrase.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image_dir / f"{image_id}.png", folder / f"{image_id}.png")


def balance_answers(records: list[dict]) -> list[dict]:
    """Each single-question record repeated round(most common answer's count / its answer's count)
    times among the records with the same question text (a yes/no question asked of 8 colours
    becomes about half yes, half no). Multi-turn records are kept once."""
    from collections import Counter

    def key(record: dict) -> tuple[str, str] | None:
        turns = record["conversations"]
        return (turns[0]["value"], turns[1]["value"]) if len(turns) == 2 else None

    counts = Counter(k for k in map(key, records) if k is not None)
    most = Counter()
    for (question, _), n in counts.items():
        most[question] = max(most[question], n)
    out = []
    for record in records:
        k = key(record)
        out.extend([record] * (max(1, round(most[k[0]] / counts[k])) if k else 1))
    return out


def export_easy_vqa(out: str | Path, instruction: str = SHORT_ANSWER_PROMPT, group_by_image: bool = False,
                    limit: int = 0, balance: bool = False) -> dict[str, int]:
    """Write easy-VQA under ``out`` (layout in the module docstring); returns records per split."""
    if limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    out = Path(out)
    counts = {}
    for split in SPLITS:
        rows, paths, answers = _easy_vqa_split(split)
        rows = rows[:limit] if limit else rows
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for image_id in sorted({image_id for _, _, image_id in rows}):
            shutil.copyfile(paths[image_id], image_dir / f"{image_id}.png")
        _write_classes(out / "classes" / ("val" if split == "test" else split), rows, image_dir)
        records = _records(split, rows, instruction, group_by_image and split == "train")
        if balance and split == "train":
            records = balance_answers(records)
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        counts[split] = len(records)
    (out / "answers.txt").write_text("\n".join(answers) + "\n")
    return counts


def run_shapes_vqa(args: argparse.Namespace) -> int:
    config = shapes_vqa.ShapesVQAConfig(
        seed=args.seed, images=args.images, test_images=args.test_images, questions_per_image=args.questions_per_image,
        img_size=args.img_size, overlap=args.overlap, background=args.background,
    )
    start = time.perf_counter()
    summary = shapes_vqa.write_shapes_vqa(args.output_dir, config, args.instruction)
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 1)}), file=sys.stdout)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.dataset == "shapes-vqa":
        return run_shapes_vqa(args)
    counts = export_easy_vqa(args.out, args.instruction, args.group_by_image, args.limit, args.balance_answers)
    print(json.dumps({"out": str(args.out), "records": counts}), file=sys.stdout)
    return 0
