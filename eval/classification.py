"""Classification metrics (pure functions) and the evaluation runner.

CLI: ``defocus-vlm eval classification --model DIR --data PATH [--split val]``. DATA is a
Fashion-MNIST IDX directory, an image folder (PATH/<split>/<class>/<image>) or a ``datasets``
directory with image and label columns; the JSON holds top-1 / top-5 for the EMA and the raw
weights when the export holds both.

Accuracy is accumulated as integer counts of correct predictions, so the result does not
depend on the batch size or the number of processes."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from defocus_vlm.cli_options import add_device, add_output_file


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the k highest logits, for each k (k is capped at
    the number of classes). Ties are broken by the lower class index."""
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    num_classes = logits.shape[1]
    # stable ranking: sort by (-logit, class index)
    order = torch.sort(-logits.float(), dim=1, stable=True).indices
    out = {}
    for k in ks:
        kk = min(k, num_classes)
        out[k] = int((order[:, :kk] == targets[:, None]).any(dim=1).sum())
    return out


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent."""
    n = targets.shape[0]
    return (
        {k: 100.0 * c / n for k, c in topk_correct(logits, targets, ks).items()}
        if n
        else {k: 0.0 for k in ks}
    )


def summarize(correct: dict[int, int], total: int) -> dict:
    out = {"samples": int(total)}
    for k, c in correct.items():
        out[f"top{k}"] = round(100.0 * c / total, 4) if total else 0.0
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Sequence[torch.Tensor]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    ks: Sequence[int] = (1, 5),
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Run ``model`` (a classifier returning ``.logits``) over ``loader`` of (pixels, labels, ...)
    batches. ``reduce`` sums a count tensor across processes (distributed evaluation)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(ks) + 1, dtype=torch.int64)
    try:
        for batch in loader:
            x, y = batch[0].to(device), batch[1]
            if dtype is not None:
                x = x.to(dtype)
            logits = model(pixel_values=x).logits.float().cpu()
            correct = topk_correct(logits, y, ks)
            counts += torch.tensor([correct[k] for k in ks] + [y.shape[0]])
    finally:
        model.train(was_training)
    if reduce is not None:
        counts = reduce(counts)
    return summarize(dict(zip(ks, counts[:-1].tolist(), strict=True)), int(counts[-1]))


def _model_dirs(model_dir: Path) -> dict[str, Path]:
    """The exported model, plus ``raw/`` beside it when training kept an EMA (main = EMA), both checked."""
    from defocus_vlm.user_files import check_model_dir

    check_model_dir(model_dir, "defocus_vision")
    if (model_dir / "raw" / "config.json").is_file():
        return {"ema": model_dir, "raw": check_model_dir(model_dir / "raw", "defocus_vision")}
    return {"model": model_dir}


def run_classification_eval(
    model_dir: str | Path,
    data: str | Path,
    split: str = "val",
    batch_size: int = 256,
    num_workers: int = 0,
    source: str = "auto",
    image_column: str = "image",
    label_column: str = "label",
    limit: int = 0,
    on_corrupt: str = "skip",
    device: str = "auto",
) -> dict:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import defocus_vlm  # noqa: F401 - registers the Auto classes
    from defocus_vlm.data.classification import ClassificationDataset, open_source
    from defocus_vlm.inference import resolve_device

    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    model_dir = Path(model_dir)
    results: dict = {"model_dir": str(model_dir), "data": str(data), "split": split}
    dirs = _model_dirs(model_dir)  # check the model before reading any data
    src = open_source(source, data, split, image_column, label_column)
    for name, path in dirs.items():
        model = AutoModelForImageClassification.from_pretrained(path).to(resolve_device(device))
        processor = AutoImageProcessor.from_pretrained(path)
        n_labels = model.config.num_labels
        if len(src.classes) > n_labels:
            raise ValueError(f"{data} has {len(src.classes)} classes but the model has {n_labels} outputs")

        def transform(img, processor=processor):
            return processor(img, return_tensors="pt")["pixel_values"][0]

        ds = ClassificationDataset(src, transform, on_corrupt=on_corrupt, limit=limit)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=False, num_workers=num_workers
        )
        results[name] = evaluate(model, loader, model.device)
    return results


def write_json(results: dict, path: str | Path | None) -> str:
    text = json.dumps(results, indent=2)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return text


def add_run_arguments(parser: argparse.ArgumentParser, items: str) -> None:
    """Options of every evaluation that batches a dataset: loader sizes, a limit on the ``items``
    evaluated, the JSON output file and the device."""
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help=f"evaluate only the first N {items}")
    add_output_file(parser)
    add_device(parser)


def add_labelled_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of every evaluation over a labelled image dataset (classification, zero-shot)."""
    parser.add_argument("--split", default="val", help="split (default: val)")
    parser.add_argument("--source", default="auto", choices=["auto", "fashion_mnist", "imagefolder", "hf"])
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    add_run_arguments(parser, "samples")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported HF model directory")
    parser.add_argument("--data", required=True, help="dataset path")
    add_labelled_data_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
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
        device=args.device,
    )
    print(write_json(results, args.output))
    return 0
