"""One picture of sample questions with each model's answers, from ``eval vqa`` outputs:
``defocus-vlm eval vqa-samples --benchmark shapes-vqa --data DIR --run NAME=EVAL_DIR ... --output PNG``.

Each panel is one question: its image, the question, the reference answer and, per run (an
``eval vqa`` output folder, named on the command line), the answer that run gave, green when it
matches (the benchmark's exact match) and red when not. The questions are the first ``--per-type`` of
each question type (a ``type`` tag, as shapes-VQA's; else the first questions) after skipping
``--skip`` of each, so the picture is the same on every call; ``--questions ID ...`` picks them instead.
matplotlib (Agg) is imported only here."""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

from defocus_vlm.cli_options import add_output_file
from defocus_vlm.data.vqa import BENCHMARKS, VQASample, get_benchmark, read_benchmark

from .vqa import PREDICTIONS_FILE, read_predictions
from .vqa_metrics import exact_match

_PANEL_W, _IMAGE_H, _LINE_H = 3.0, 2.2, 0.19  # inches
_COLUMNS = 3


def pick_samples(samples: Sequence[VQASample], per_type: int, skip: int = 0,
                 questions: Sequence[str] = ()) -> list[VQASample]:
    """``questions`` (by id, in that order) if given; else the questions ``skip`` to ``skip + per_type`` of
    each type, types in order of first appearance (untagged samples count as one type)."""
    if questions:
        by_id = {s.question_id: s for s in samples}
        missing = [q for q in questions if q not in by_id]
        if missing:
            raise ValueError(f"no question {missing[0]!r} in the benchmark split")
        return [by_id[q] for q in questions]
    by_type: dict[str, list[VQASample]] = {}
    for s in samples:
        by_type.setdefault(dict(s.tags).get("type", ""), []).append(s)
    return [s for group in by_type.values() for s in group[skip : skip + per_type]]


def read_runs(runs: Sequence[str]) -> dict[str, dict[str, str]]:
    """``NAME=DIR`` -> {name: question_id -> answer} from each DIR's predictions."""
    out = {}
    for run in runs:
        name, sep, folder = run.partition("=")
        if not sep or not name:
            raise ValueError(f"--run expects NAME=EVAL_DIR, got {run!r}")
        path = Path(folder) / PREDICTIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected the output folder of `defocus-vlm eval vqa`")
        out[name] = read_predictions(path)
    return out


def draw(samples: Sequence[VQASample], runs: dict[str, dict[str, str]], output: str | Path) -> Path:
    """The picture (PNG) of ``samples`` with every run's answer; a run that skipped a question shows '-'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(samples) // _COLUMNS)
    lines = 4 + len(runs)  # question (2 lines), reference, tags, one per run
    height = _IMAGE_H + lines * _LINE_H
    fig = plt.figure(figsize=(_COLUMNS * _PANEL_W, rows * height))
    for k, sample in enumerate(samples):
        row, col = divmod(k, _COLUMNS)
        bottom = 1 - (row + 1) * height / (rows * height)
        ax = fig.add_axes((col / _COLUMNS + 0.01, bottom + lines * _LINE_H / (rows * height),
                           1 / _COLUMNS - 0.02, _IMAGE_H / (rows * height) * 0.95))
        ax.imshow(sample.load_image())
        ax.set_axis_off()
        tags = dict(sample.tags)
        text = [(textwrap.shorten(sample.question, 90), "black"), (f"answer: {sample.answers[0]}", "black"),
                (" / ".join(tags[k] for k in ("type", "region") if k in tags), "gray")]
        for name, answers in runs.items():
            answer = answers.get(sample.question_id)
            ok = answer is not None and exact_match(answer, sample.answers[0])
            text.append((f"{name}: {answer if answer is not None else '-'}", "green" if ok else "red"))
        y = bottom + (lines - 0.3) * _LINE_H / (rows * height)
        for line, colour in text:
            for part in textwrap.wrap(line, 48)[:2]:
                fig.text(col / _COLUMNS + 0.01, y, part, fontsize=7, color=colour, va="top")
                y -= _LINE_H / (rows * height)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    parser.add_argument("--data", default=None, help="the benchmark's folder or file, as for `eval vqa`")
    parser.add_argument("--split", default=None, help="split (default: the benchmark's usual evaluation split)")
    parser.add_argument("--image-dir", default=None, help="where the images are, if not in the usual place")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=EVAL_DIR",
                        help="a model's `eval vqa` output folder and the name to show it under (repeat per model)")
    parser.add_argument("--per-type", type=int, default=1, help="questions per question type (default: 1)")
    parser.add_argument("--skip", type=int, default=0, help="skip this many questions of each type first")
    parser.add_argument("--questions", nargs="*", default=(), help="these question ids instead")
    add_output_file(parser, help="the PNG to write", required=True)


def run_cli(args: argparse.Namespace) -> int:
    if args.per_type < 1 or args.skip < 0:
        raise ValueError(f"--per-type must be >= 1 and --skip >= 0, got {args.per_type} and {args.skip}")
    split = args.split or get_benchmark(args.benchmark).default_split
    samples = pick_samples(read_benchmark(args.benchmark, args.data, split, args.image_dir), args.per_type,
                           args.skip, args.questions)
    path = draw(samples, read_runs(args.run), args.output)
    print(json.dumps({"output": str(path), "questions": [s.question_id for s in samples]}))
    return 0
