"""Augmentation from timm: RandomResizedCrop + flip, RandAugment, colour jitter, random erasing,
mixup / cutmix with label smoothing. Grey (1-channel) data goes through the same RGB ops and is
turned back to grey before normalisation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchvision import transforms as T

from defocus_vlm.constants import IMAGENET_MEAN, IMAGENET_STD, default_normalisation
from defocus_vlm.image_io import to_pil

from .config import AugmentConfig, DataConfig

if TYPE_CHECKING:
    from timm.data import Mixup

    from defocus_vlm.image_processing_defocus import DefocusImageProcessor


def mean_std(data: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if data.mean is not None and data.std is not None:
        return tuple(data.mean), tuple(data.std)
    return default_normalisation(data.in_chans)


def image_processor(data: DataConfig) -> DefocusImageProcessor:
    """The evaluation transform, as the processor that is exported with the model."""
    from defocus_vlm import DefocusImageProcessor

    mean, std = mean_std(data)
    return DefocusImageProcessor(
        size=data.img_size,
        crop_pct=data.crop_pct,
        image_mean=list(mean),
        image_std=list(std),
        num_channels=data.in_chans,
    )


class EvalTransform:
    def __init__(self, data: DataConfig):
        self.processor = image_processor(data)

    def __call__(self, img) -> torch.Tensor:
        return torch.from_numpy(self.processor._one(img))


def _patch_timm_posterize() -> None:
    """timm's RandAugment "inc1" can ask for posterize with 0 bits at magnitude 10; Pillow >= 13
    refuses 0 (older Pillow returned a black image). Keep the old result so the DeiT recipe runs."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **__):
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return ImageOps.posterize(img, bits_to_keep)

    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize


class TrainTransform:
    def __init__(self, data: DataConfig, aug: AugmentConfig):
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms_factory import transforms_imagenet_train

        _patch_timm_posterize()

        primary, secondary, _ = transforms_imagenet_train(
            img_size=data.img_size,
            scale=tuple(aug.scale),
            hflip=aug.hflip,
            color_jitter=aug.color_jitter or None,
            auto_augment=aug.rand_augment or None,
            interpolation=data.interpolation,
            separate=True,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        self.geometric = T.Compose([primary, secondary])
        mean, std = mean_std(data)
        self.channels = data.in_chans
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.erase = (
            RandomErasing(aug.random_erasing, mode="pixel", device="cpu") if aug.random_erasing > 0 else None
        )

    def __call__(self, img) -> torch.Tensor:
        img = self.geometric(to_pil(img, 3))
        if self.channels == 1:
            img = img.convert("L")
        x = self.normalize(img)
        return self.erase(x) if self.erase is not None else x


def build_mixup(aug: AugmentConfig, num_classes: int) -> Mixup | None:
    """timm Mixup (mixup / cutmix + label smoothing) or None when both alphas are 0."""
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        mode="batch",
        label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )


def smooth_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing (timm's convention: off = smoothing / C)."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32)
    return target.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def make_targets(images: torch.Tensor, labels: torch.Tensor, mixup: Mixup | None, aug: AugmentConfig,
                 num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if mixup is not None:
        return mixup(images, labels)
    if aug.label_smoothing > 0:
        return images, smooth_targets(labels, num_classes, aug.label_smoothing)
    return images, labels
