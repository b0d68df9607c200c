"""Image-text retrieval recall with a CLIP model: image->text and text->image R@1/5/10.

Pairs are grouped as in COCO-style evaluation: identical images (same file) are one image and
identical captions are one text; an image and a text match when some pair joins them. So an image
with five captions is one query with five right answers, and a caption shared by many images
("a blue circle.") is one query that any of them answers. R@K is the percentage of queries with a
right answer among the K nearest (cosine).

CLI: ``defocus-vlm eval retrieval --model DIR --data PAIRS [--split test]``; PAIRS is anything
``data.source`` reads in a CLIP run config: a CSV / JSONL file, tar shards, a ``datasets``
directory, or ``easy-vqa`` (captions from the first template)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .classification import add_run_arguments, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from defocus_vlm.data.pairs import PairDataset
    from defocus_vlm.modeling_clip import DefocusCLIPModel


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, int]:
    """Number of queries (rows) with a positive among their k highest-scoring candidates, for each k
    (capped at the number of candidates). Ties are broken by the lower candidate index."""
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"expected scores and positives of the same (queries, candidates) shape, got "
                         f"{tuple(scores.shape)} and {tuple(positives.shape)}")
    order = torch.sort(-scores.float(), dim=1, stable=True).indices
    hits = positives.gather(1, order)
    return {k: int(hits[:, : min(k, scores.shape[1])].any(dim=1).sum()) for k in ks}


def group_pairs(image_keys: Sequence[str], captions: Sequence[str]) -> tuple[list[int], list[str], torch.Tensor]:
    """(index of the first pair of each distinct image, distinct captions, positives (images, texts))."""
    image_index: dict[str, int] = {}
    text_index: dict[str, int] = {}
    first_pair, links = [], []
    for pair, (key, caption) in enumerate(zip(image_keys, captions, strict=True)):
        if key not in image_index:
            image_index[key] = len(first_pair)
            first_pair.append(pair)
        text_index.setdefault(caption, len(text_index))
        links.append((image_index[key], text_index[caption]))
    positives = torch.zeros(len(first_pair), len(text_index), dtype=torch.bool)
    for i, t in links:
        positives[i, t] = True
    return first_pair, list(text_index), positives


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, positives: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict:
    scores = image_embeds.float() @ text_embeds.float().T
    i2t, t2i = recall_at_k(scores, positives, ks), recall_at_k(scores.T, positives.T, ks)
    out: dict = {"images": int(positives.shape[0]), "texts": int(positives.shape[1])}
    for k in ks:
        out[f"i2t_r{k}"] = round(100.0 * i2t[k] / positives.shape[0], 4)
    for k in ks:
        out[f"t2i_r{k}"] = round(100.0 * t2i[k] / positives.shape[1], 4)
    return out


@torch.no_grad()
def evaluate_retrieval(model: DefocusCLIPModel, dataset: PairDataset, tokenizer: PreTrainedTokenizerBase,
                       max_length: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None, batch_size: int = 256, num_workers: int = 0,
                       ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Retrieval recall on a :class:`~defocus_vlm.data.pairs.PairDataset`; each distinct caption is
    encoded once (truncated to ``max_length`` tokens)."""
    keys = [dataset.source.where(i) for i in range(len(dataset))]
    was_training = model.training
    model.eval()
    try:
        image_feats, text_feats, captions = [], {}, []
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=_pixels_and_captions)
        for pixels, batch_captions in loader:
            x = pixels.to(device, dtype) if dtype is not None else pixels.to(device)
            image_feats.append(F.normalize(model.get_image_features(pixel_values=x).pooler_output.float(), dim=-1))
            new = [c for c in dict.fromkeys(batch_captions) if c not in text_feats]
            if new:
                text = tokenizer(new, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                out = model.get_text_features(input_ids=text["input_ids"].to(device),
                                              attention_mask=text["attention_mask"].to(device))
                text_feats.update(zip(new, F.normalize(out.pooler_output.float(), dim=-1).cpu()))
            captions.extend(batch_captions)
    finally:
        model.train(was_training)
    first_pair, texts, positives = group_pairs(keys, captions)
    images = torch.cat(image_feats).cpu()[first_pair]
    return retrieval_metrics(images, torch.stack([text_feats[t] for t in texts]), positives, ks)


def _pixels_and_captions(items: list) -> tuple[torch.Tensor, list[str]]:
    pixels, captions, _ = zip(*items)
    return torch.stack(pixels), list(captions)


def run_retrieval_eval(model_dir: str | Path, data: str, source: str = "auto", split: str = "test",
                       batch_size: int = 256, num_workers: int = 0, image_column: str = "image",
                       caption_column: str = "caption", limit: int = 0, device: str = "auto") -> dict:
    from transformers import AutoProcessor

    from defocus_vlm.data.pairs import PairDataset, open_pairs
    from defocus_vlm.inference import resolve_device
    from defocus_vlm.modeling_clip import load_clip
    from defocus_vlm.user_files import check_model_dir

    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    check_model_dir(model_dir, "defocus_clip")  # before any data is read
    model = load_clip(model_dir).eval().to(resolve_device(device))
    processor = AutoProcessor.from_pretrained(model_dir)
    pairs = open_pairs(source, data, split, image_column, caption_column, sample_templates=False)

    def transform(img):
        return processor.image_processor(img, return_tensors="pt")["pixel_values"][0]

    dataset = PairDataset(pairs, transform, on_corrupt="fail", limit=limit)  # a skipped image would shift the pairs
    tokenizer = processor.tokenizer
    result = evaluate_retrieval(model, dataset, tokenizer, tokenizer.model_max_length, device=model.device,
                                batch_size=batch_size, num_workers=num_workers)
    return {"model_dir": str(model_dir), "data": str(data), "split": split, **result}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    from defocus_vlm.data.pairs import PAIR_SOURCES

    parser.add_argument("--model", required=True, help="saved CLIP directory (e.g. runs/clip/model)")
    parser.add_argument("--data", required=True, help="pairs: a .csv / .jsonl file, tar shards, a datasets "
                                                      "directory, or easy-vqa")
    parser.add_argument("--source", default="auto", choices=list(PAIR_SOURCES))
    parser.add_argument("--split", default="test", help="split of built-in / datasets sources (default: test)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    add_run_arguments(parser, "pairs")


def run_cli(args: argparse.Namespace) -> int:
    results = run_retrieval_eval(args.model, args.data, source=args.source, split=args.split,
                                 batch_size=args.batch_size, num_workers=args.num_workers,
                                 image_column=args.image_column, caption_column=args.caption_column,
                                 limit=args.limit, device=args.device)
    print(write_json(results, args.output))
    return 0
