"""A classification split decoded once into one uint8 tensor (Fashion-MNIST, and small datasets whose
images share one size), served a whole batch at a time: the DataLoader hands :class:`DecodedDataset`
the batch's ``(index, seed)`` pairs (``__getitems__``) and the batch transform augments them together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from defocus_vlm.image_io import ImageError

from .classification import IdxSource

DECODE_MAX_BYTES = 2**30  # larger splits stay per-image (decoded lazily, one image at a time)

BatchTransform = Callable[[torch.Tensor, list[int]], torch.Tensor]


def decode_split(source: Any, in_chans: int, limit: int = 0,
                 max_bytes: int = DECODE_MAX_BYTES) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(images uint8 (N, C, H, W), labels int64 (N,))`` of the first ``limit`` samples (0 = all), or
    None when they do not fit: images of several sizes, an unreadable image (the per-image path applies
    ``data.on_corrupt`` to it) or more than ``max_bytes``."""
    n = min(limit, len(source)) if limit else len(source)
    if isinstance(source, IdxSource):  # already uint8 in memory: a view, no copy
        images = torch.from_numpy(source.images[:n].copy())[:, None]  # the IDX buffer is read-only
        labels = torch.from_numpy(source.labels[:n])
        return (images.expand(-1, in_chans, -1, -1).contiguous() if in_chans != 1 else images), labels
    mode = "L" if in_chans == 1 else "RGB"
    try:
        first, _ = source.load(0)
        if n * in_chans * first.width * first.height > max_bytes:
            return None
        images = torch.empty(n, in_chans, first.height, first.width, dtype=torch.uint8)
        labels = torch.empty(n, dtype=torch.int64)
        for i in range(n):
            img, labels[i] = source.load(i)
            if img.size != first.size:
                return None
            arr = np.array(img.convert(mode)).reshape(first.height, first.width, in_chans)
            images[i] = torch.from_numpy(arr).permute(2, 0, 1)
    except (ImageError, OSError):
        return None
    return images, labels


class DecodedDataset(Dataset):
    """Items ``(pixel_values, label, skipped=0)``; indices are the training sampler's ``(index, seed)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform, classes: list[str]):
        self.images, self.labels, self.transform, self.classes = images, labels, transform, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        x, y, skipped = self.__getitems__([item])
        return x[0], int(y[0]), int(skipped[0])

    def __getitems__(self, items: list[tuple[int, int]]):
        """The whole batch at once (the DataLoader calls this with the batch's sampler items)."""
        idx = torch.tensor([int(i) for i, _ in items])
        x = self.transform(self.images[idx], [int(s) for _, s in items])
        return x, self.labels[idx], torch.zeros(len(items), dtype=torch.int64)


def collate_batch(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``collate_fn`` for :class:`DecodedDataset`: its ``__getitems__`` already returns the batch."""
    return batch
