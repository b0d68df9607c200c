"""Zero-shot classification with a CLIP model: each class is the mean embedding of its prompts (one
per template, "a photo of a {}."), images go to the nearest class (cosine); top-1 / top-5.

CLI: ``defocus-vlm eval zeroshot --model DIR --data PATH --classnames FILE|fashion-mnist|easy-vqa|imagenet
[--templates FILE] [--split val]``. DATA is any labelled dataset that
``defocus-vlm eval classification`` reads (Fashion-MNIST IDX files, an image folder, a ``datasets``
directory); the class names must follow its label order. ``easy-vqa`` names the 24 colour-shape
classes of a ``defocus-vlm data easy-vqa`` export's ``classes/`` folder. ImageNet class names come from timm
(offline). Template files hold one template per line, each with one ``{}``."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .classification import add_labelled_data_arguments, summarize, topk_correct, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from defocus_vlm.modeling_clip import DefocusCLIPModel

# A few generic prompt templates for ImageNet-style photos (ensembled).
IMAGENET_TEMPLATES = [
    "a photo of a {}.", "a photo of the {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a cropped photo of the {}.", "a good photo of a {}.", "a drawing of a {}.",
]


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names in label order, from timm (first synonym: "tench")."""
    from timm.data import ImageNetInfo

    return [d.split(",")[0].strip() for d in ImageNetInfo().label_descriptions()]


def _lines(path: str | Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path} is empty (expected one entry per line)")
    return lines


def _key(spec: str) -> str:
    return spec.lower().replace("_", "-")


def load_classnames(spec: str) -> list[str]:
    """``fashion-mnist``, ``easy-vqa``, ``imagenet`` or a file with one class name per line (in label order)."""
    from defocus_vlm.data.easy_vqa import class_names
    from defocus_vlm.data.pairs import FASHION_MNIST_NAMES

    key = _key(spec)
    if key == "fashion-mnist":
        return list(FASHION_MNIST_NAMES)
    if key == "easy-vqa":
        return class_names()
    if key == "imagenet":
        return imagenet_classnames()
    return _lines(spec, "class names")


def load_templates(spec: str | None, classnames: str) -> list[str]:
    """A file (one template per line), or the built-in set for the class names: the caption templates
    of Fashion-MNIST's or easy-VQA's stage-2 training, generic photo templates otherwise."""
    from defocus_vlm.data.pairs import EASY_VQA_TEMPLATES, FASHION_TEMPLATES, check_templates

    if spec is not None:
        return check_templates(_lines(spec, "templates"), str(spec))
    built_in = {"fashion-mnist": FASHION_TEMPLATES, "easy-vqa": EASY_VQA_TEMPLATES}
    if _key(classnames) in built_in:
        return list(built_in[_key(classnames)])
    return list(IMAGENET_TEMPLATES)


@torch.no_grad()
def text_classifier(model: DefocusCLIPModel, tokenizer: PreTrainedTokenizerBase, classnames: Sequence[str],
                    templates: Sequence[str], device: torch.device | str = "cpu",
                    batch_size: int = 256) -> torch.Tensor:
    """(C, D) unit vectors: per class, the normalised mean of its normalised prompt embeddings."""
    prompts = [t.format(name) for name in classnames for t in templates]
    embeds = []
    for start in range(0, len(prompts), batch_size):
        text = tokenizer(prompts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
        out = model.get_text_features(input_ids=text["input_ids"].to(device),
                                      attention_mask=text["attention_mask"].to(device))
        embeds.append(F.normalize(out.pooler_output.float(), dim=-1))
    per_class = torch.cat(embeds).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(per_class, dim=-1)


@torch.no_grad()
def image_embeddings(model: DefocusCLIPModel, loader: Iterable[Sequence[torch.Tensor]],
                     device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image embeddings (N, D) and labels (N,) of a loader of ``(pixels, label, ...)`` batches."""
    feats, labels = [], []
    for batch in loader:
        x = batch[0].to(device, dtype) if dtype is not None else batch[0].to(device)
        feats.append(F.normalize(model.get_image_features(pixel_values=x).pooler_output.float(), dim=-1).cpu())
        labels.append(torch.as_tensor(batch[1]))
    return torch.cat(feats), torch.cat(labels)


def evaluate_zeroshot(model: DefocusCLIPModel, tokenizer: PreTrainedTokenizerBase,
                      dataset: torch.utils.data.Dataset, classnames: Sequence[str], templates: Sequence[str],
                      device: torch.device | str = "cpu", dtype: torch.dtype | None = None, batch_size: int = 256,
                      num_workers: int = 0, ks: Sequence[int] = (1, 5)) -> dict:
    """Zero-shot top-k (percent) on ``dataset`` of ``(pixels, label, ...)`` items."""
    was_training = model.training
    model.eval()
    try:
        classifier = text_classifier(model, tokenizer, classnames, templates, device)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        images, labels = image_embeddings(model, loader, device, dtype)
    finally:
        model.train(was_training)
    correct = topk_correct(images @ classifier.T, labels, ks)
    return summarize(correct, len(labels))


def run_zeroshot_eval(model_dir: str | Path, data: str | Path, classnames: str, templates: str | None = None,
                      split: str = "val", batch_size: int = 256, num_workers: int = 0, source: str = "auto",
                      image_column: str = "image", label_column: str = "label", limit: int = 0,
                      device: str = "auto") -> dict:
    from transformers import AutoProcessor

    from defocus_vlm.data.classification import ClassificationDataset, open_source
    from defocus_vlm.inference import resolve_device
    from defocus_vlm.modeling_clip import load_clip
    from defocus_vlm.user_files import check_model_dir

    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    names = load_classnames(classnames)
    prompts = load_templates(templates, classnames)
    check_model_dir(model_dir, "defocus_clip")  # before any data is read
    model = load_clip(model_dir).eval().to(resolve_device(device))
    processor = AutoProcessor.from_pretrained(model_dir)
    src = open_source(source, data, split, image_column, label_column)
    if len(src.classes) != len(names):
        raise ValueError(f"{data} has {len(src.classes)} classes but {len(names)} class names were given "
                         f"({classnames})")

    def transform(img):
        return processor.image_processor(img, return_tensors="pt")["pixel_values"][0]

    dataset = ClassificationDataset(src, transform, limit=limit)
    result = evaluate_zeroshot(model, processor.tokenizer, dataset, names, prompts, device=model.device,
                               batch_size=batch_size, num_workers=num_workers)
    return {"model_dir": str(model_dir), "data": str(data), "split": split, "classes": len(names),
            "templates": len(prompts), **result}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved CLIP directory (e.g. runs/clip/model)")
    parser.add_argument("--data", required=True, help="labelled dataset path")
    parser.add_argument("--classnames", required=True,
                        help="fashion-mnist, easy-vqa, imagenet, or a file with one class name per line (label order)")
    parser.add_argument("--templates", default=None, help="file with one prompt template per line ('a photo of a {}.')")
    add_labelled_data_arguments(parser)


def run_cli(args: argparse.Namespace) -> int:
    results = run_zeroshot_eval(args.model, args.data, args.classnames, args.templates, split=args.split,
                                batch_size=args.batch_size, num_workers=args.num_workers, source=args.source,
                                image_column=args.image_column, label_column=args.label_column, limit=args.limit,
                                device=args.device)
    print(write_json(results, args.output))
    return 0
