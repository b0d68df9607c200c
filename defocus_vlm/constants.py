"""Facts that several layers share, defined once: the image placeholder of prompts and LLaVA data,
and the default image normalisation."""

from __future__ import annotations

# The placeholder that stands for one image in text (LLaVA's convention); the processor expands it
# into the image's tokens.
IMAGE_TOKEN = "<image>"

# timm / torchvision ImageNet statistics: the default for RGB images.
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
# Grey images: one channel mapped to [-1, 1].
GREY_MEAN: tuple[float, ...] = (0.5,)
GREY_STD: tuple[float, ...] = (0.5,)


def default_normalisation(num_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for images of ``num_channels`` channels when the user gives none."""
    return (IMAGENET_MEAN, IMAGENET_STD) if num_channels == 3 else (GREY_MEAN, GREY_STD)
