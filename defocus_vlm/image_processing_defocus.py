"""Image processor: any image -> resized, centre-cropped, normalised (B, C, H, W) tensor."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .constants import default_normalisation
from .image_io import to_pil


class DefocusImageProcessor(BaseImageProcessor):
    """DeiT-style evaluation transform.

    The shorter side is resized to ``size / crop_pct`` (bicubic), then the centre
    ``size x size`` is cropped; pixels are scaled to [0, 1] and normalised. ``num_channels=1``
    gives grey images (e.g. Fashion-MNIST models).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 224,
        crop_pct: float = 0.875,
        image_mean: tuple[float, ...] | list[float] | None = None,
        image_std: tuple[float, ...] | list[float] | None = None,
        num_channels: int = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size = int(size)
        self.crop_pct = float(crop_pct)
        default_mean, default_std = default_normalisation(num_channels)
        self.image_mean = list(image_mean if image_mean is not None else default_mean)
        self.image_std = list(image_std if image_std is not None else default_std)
        self.num_channels = num_channels
        if len(self.image_mean) != num_channels or len(self.image_std) != num_channels:
            raise ValueError(f"image_mean/image_std need {num_channels} values")

    def _one(self, image) -> np.ndarray:
        img = to_pil(image, self.num_channels)
        scale = self.size / self.crop_pct / min(img.size)
        new = (max(self.size, round(img.size[0] * scale)), max(self.size, round(img.size[1] * scale)))
        img = img.resize(new, Image.BICUBIC)
        left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[..., None] if arr.ndim == 2 else arr
        arr = (arr - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return arr.transpose(2, 0, 1)

    def preprocess(
        self,
        images: Image.Image | np.ndarray | torch.Tensor | str | os.PathLike
        | Sequence[Image.Image | np.ndarray | torch.Tensor | str | os.PathLike],
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        batch = np.stack([self._one(im) for im in images])
        data = {"pixel_values": torch.from_numpy(batch) if return_tensors == "pt" else batch}
        return BatchFeature(data=data)

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)
