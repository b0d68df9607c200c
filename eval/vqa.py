"""VQA evaluation runner: batched greedy answers, a predictions JSONL that a rerun resumes, a metrics JSON.

CLI: ``defocus-vlm eval vqa --model DIR --benchmark NAME [--data PATH] [--split S] [--batch-size N]
[--limit N] [--output-dir DIR]`` (``--answer-prior type|question`` instead of ``--model``: the no-image
baseline of :mod:`eval.vqa_prior`). Benchmarks: easy-vqa (the ``easy-vqa`` package, or a LLaVA-JSON export
as --data), shapes-vqa (accuracy also per question type and region), vqav2, textvqa, gqa, pope, scienceqa,
mmbench (file layouts in :mod:`defocus_vlm.data.vqa`). Writes ``predictions.jsonl`` and ``metrics.json`` to the output
folder and prints the metrics; rerunning with the same folder only answers the questions not yet there.

The runner only needs an *answerer*: a function from a batch of (image, prompt) pairs to answers.
:class:`defocus_vlm.inference.VLMAnswerer` is the one for an exported vision-language model; tests use
fakes. Metrics are computed from the predictions file in question order, so they do not depend on the batch size or on
how often the run was interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from defocus_vlm.cli_options import add_device, add_output_dir
from defocus_vlm.data.vqa import BENCHMARKS, VQASample, build_prompt, get_benchmark, read_benchmark
from defocus_vlm.inference import VLMAnswerer
from defocus_vlm.run_lock import RunLock

from .vqa_metrics import (
    exact_match,
    gqa_match,
    mmbench_choice,
    pope_metrics,
    scienceqa_choice,
    textvqa_accuracy,
    vqa_accuracy,
)
from .vqa_prior import PRIORS, PriorAnswerer, prior_answers

Answerer = Callable[[Sequence[tuple[Image.Image, str]]], list[str]]

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"  # what produced the predictions: a rerun must match it to resume


# --- metrics of a whole run ----------------------------------------------------------------------


_CHOICE_EXTRACTORS: dict[str, Callable[[str, Sequence[str]], str | None]] = {
    "scienceqa": scienceqa_choice,
    "mmbench": mmbench_choice,
}


def _mean_percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def _breakdowns(samples: Sequence[VQASample], scores: Sequence[float]) -> dict:
    """``accuracy_by_<key>``: accuracy and count per value of each tag the samples carry."""
    groups: dict[str, dict[str, list[float]]] = {}
    for sample, score in zip(samples, scores):
        for key, value in sample.tags:
            groups.setdefault(key, {}).setdefault(value, []).append(float(score))
    return {
        f"accuracy_by_{key}": {v: {"accuracy": _mean_percent(x), "samples": len(x)} for v, x in sorted(by.items())}
        for key, by in groups.items()
    }


def compute_metrics(benchmark: str, samples: Sequence[VQASample], predictions: dict[str, str]) -> dict:
    """The benchmark's scores (in percent) of ``predictions`` (question_id -> answer) on ``samples``."""
    missing = [s.question_id for s in samples if s.question_id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. question_id {missing[0]!r}")
    answers = [predictions[s.question_id] for s in samples]
    out: dict = {"benchmark": benchmark, "samples": len(samples)}
    # each benchmark is scored as its official scorer does (docs/metrics.md)
    if benchmark in ("vqav2", "textvqa"):
        accuracy = vqa_accuracy if benchmark == "vqav2" else textvqa_accuracy
        out["accuracy"] = _mean_percent([accuracy(a, s.answers) for a, s in zip(answers, samples)])
    elif benchmark == "pope":
        out.update(pope_metrics(answers, [s.answers[0] for s in samples]))
    elif get_benchmark(benchmark).multiple_choice:
        extract = _CHOICE_EXTRACTORS[benchmark]
        letters = [extract(a, s.choices) for a, s in zip(answers, samples)]
        out["accuracy"] = _mean_percent([letter == s.answers[0] for letter, s in zip(letters, samples)])
        out["unparsed"] = sum(letter is None for letter in letters)
    else:
        match = gqa_match if benchmark == "gqa" else exact_match
        correct = [match(a, s.answers[0]) for a, s in zip(answers, samples)]
        out["accuracy"] = _mean_percent(correct)
        out.update(_breakdowns(samples, correct))
    return out


# --- predictions file ----------------------------------------------------------------------------


def read_predictions(path: Path) -> dict[str, str]:
    """question_id -> prediction from a JSONL written by :func:`run_vqa_eval`. A last line cut off by
    an interrupted run is dropped (and removed from the file); a complete last record that lacks only
    its newline gets one, so the next appended record starts on a line of its own. Any other bad line
    is an error."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    predictions: dict[str, str] = {}
    for line_no, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            predictions[str(record["question_id"])] = str(record["prediction"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            if line_no == len(lines) and not line.endswith("\n"):
                path.write_text("".join(lines[:-1]), encoding="utf-8")
                return predictions
            raise ValueError(
                f"{path}: line {line_no} is not a prediction record "
                f'(expected {{"question_id": ..., "prediction": ...}}): {err}'
            ) from err
    if lines and not lines[-1].endswith("\n"):
        with path.open("a", encoding="utf-8") as out:
            out.write("\n")
    return predictions


def _check_run_info(path: Path, info: dict) -> None:
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); use another output folder") from err
        if previous != info:
            raise ValueError(
                f"{path.parent} holds predictions of another run ({json.dumps(previous)}), not of "
                f"{json.dumps(info)}; use another output folder"
            )
    else:
        path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def run_vqa_eval(
    answerer: Answerer,
    samples: Sequence[VQASample],
    benchmark: str,
    output_dir: str | os.PathLike,
    batch_size: int = 16,
    progress: bool = True,
    run_info: dict | None = None,
) -> dict:
    """Answer every sample not yet in ``output_dir/predictions.jsonl`` (appending batch by batch, so an
    interrupted run loses at most one batch), then write and return the metrics.

    ``run_info`` (model, split, generation settings: anything JSON) is kept in ``run.json``; resuming
    predictions that another run_info produced is refused."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    seen: set[str] = set()
    for sample in samples:
        if sample.question_id in seen:
            raise ValueError(f"question_id {sample.question_id!r} occurs twice; predictions are kept by question_id")
        seen.add(sample.question_id)
    output_dir = Path(output_dir)
    lock = RunLock(output_dir, "--output-dir")  # two evaluations appending to one predictions file would mix
    try:
        if lock.message():
            print(lock.message(), file=sys.stderr, flush=True)
        return _answer_and_score(answerer, samples, benchmark, output_dir, batch_size, progress, run_info)
    finally:
        lock.release()


def _answer_and_score(answerer: Answerer, samples: Sequence[VQASample], benchmark: str, output_dir: Path,
                      batch_size: int, progress: bool, run_info: dict | None) -> dict:
    _check_run_info(output_dir / RUN_FILE, {"benchmark": benchmark, **(run_info or {})})
    predictions_path = output_dir / PREDICTIONS_FILE
    predictions = read_predictions(predictions_path)
    todo = [s for s in samples if s.question_id not in predictions]
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=benchmark, disable=not progress)
    with predictions_path.open("a", encoding="utf-8") as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers = answerer([(s.load_image(), build_prompt(s)) for s in batch])
            if len(answers) != len(batch):
                raise ValueError(f"the answerer returned {len(answers)} answers for {len(batch)} questions")
            for sample, answer in zip(batch, answers):
                predictions[sample.question_id] = answer
                record = {"question_id": sample.question_id, "prediction": answer, "answers": list(sample.answers)}
                out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update(len(batch))
    bar.close()

    metrics = compute_metrics(benchmark, samples, predictions)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


# --- CLI -----------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="exported vision-language model directory")
    source.add_argument("--answer-prior", choices=PRIORS, default=None,
                        help="no model: answer each question with the training split's most common answer of its "
                             "type or of its text (eval/vqa_prior.py; benchmarks with question types: shapes-vqa)")
    parser.add_argument("--train-split", default="train", help="the split --answer-prior counts answers on")
    parser.add_argument("--benchmark", required=True, choices=list(BENCHMARKS), help="which benchmark")
    parser.add_argument(
        "--data", default=None,
        help="the benchmark's folder or file (easy-vqa: optional LLaVA-JSON export; shapes-vqa: the export folder)",
    )
    parser.add_argument("--split", default=None, help="split (default: the benchmark's usual evaluation split)")
    parser.add_argument("--image-dir", default=None, help="where the images are, if not in the usual place")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    add_device(parser)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add_output_dir(parser, help="where predictions.jsonl and metrics.json go (default: runs/vqa/...)", required=False)


def run_cli(args: argparse.Namespace) -> int:
    split = args.split or get_benchmark(args.benchmark).default_split
    if args.limit < 0 or args.batch_size <= 0:
        raise ValueError(f"--limit must be >= 0 and --batch-size > 0, got {args.limit} and {args.batch_size}")
    samples = read_benchmark(args.benchmark, args.data, split, args.image_dir)
    if args.limit:
        samples = samples[: args.limit]
    name = Path(args.model).name if args.model else f"answer-prior-{args.answer_prior}"
    output_dir = args.output_dir or Path("runs") / "vqa" / name / f"{args.benchmark}-{split}"
    if args.answer_prior:
        train = read_benchmark(args.benchmark, args.data, args.train_split, args.image_dir)
        answerer = PriorAnswerer(prior_answers(train, samples, args.answer_prior))
        model = f"answer prior by {args.answer_prior} of {args.train_split}"
    else:
        answerer = VLMAnswerer(args.model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
        model = str(Path(args.model).resolve())
    run_info = {
        "model": model,
        "data": str(Path(args.data).resolve()) if args.data else None,
        "split": split,
        "max_new_tokens": args.max_new_tokens,
    }
    metrics = run_vqa_eval(answerer, samples, args.benchmark, output_dir, args.batch_size, run_info=run_info)
    print(json.dumps({**metrics, "split": split, "output_dir": str(output_dir)}, indent=2))
    return 0
