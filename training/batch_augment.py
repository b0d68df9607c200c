"""Batch augmentation of uint8 image tensors: random resized crop + horizontal flip + random erasing
(the Fashion-MNIST recipe's augmentation, and any recipe without RandAugment / colour jitter), one
batched resampling call instead of a PIL pipeline per image.

Definition (what the tests hold it to): every sample's randomness comes from its own
``torch.Generator`` seeded with the sampler's per-sample seed, so a batch equals the samples augmented
one by one (:func:`augment_one`) and a resumed run sees the same crops. The parameters follow timm's
``RandomResizedCropAndInterpolation`` (area in ``scale``, log-uniform ratio in 3/4..4/3, 10 tries, then
a centre crop) and ``RandomErasing(mode="pixel")`` (one box, area 2-33 %, log-uniform ratio 0.3..3.3,
per-pixel N(0, 1) after normalisation). The crop is resampled with ``grid_sample`` (its bilinear,
bicubic A=-0.75 or nearest; no antialias), not PIL's filters: the pixels differ slightly from the
per-image PIL path (``augment.engine=pil``), the distribution of crops, flips and boxes does not."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import AugmentConfig, ConfigError, DataConfig

RATIO = (3 / 4, 4 / 3)  # timm's / torchvision's RandomResizedCrop aspect range
ERASE_AREA, ERASE_MIN_ASPECT = (0.02, 1 / 3), 0.3  # timm RandomErasing defaults
TRIES = 10
MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def batch_augment_blocker(data: DataConfig, aug: AugmentConfig) -> str | None:
    """Why this recipe needs the per-image PIL path, or None when the batch path implements it."""
    if aug.rand_augment:
        return "augment.rand_augment is set (PIL operations)"
    if aug.color_jitter:
        return "augment.color_jitter is not 0 (PIL operations)"
    if data.interpolation not in MODES:
        return f"data.interpolation={data.interpolation!r} (the batch path resamples with {', '.join(MODES)})"
    return None


@dataclass(frozen=True)
class SampleParams:
    """One sample's crop box (in source pixels), flip, and erase box (in output pixels) with its noise."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    erase: tuple[int, int, int, int] | None = None  # top, left, height, width
    noise: torch.Tensor | None = None  # (C, height, width)


def _crop_box(u: list[float], h: int, w: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """timm's RandomResizedCrop box from 4 uniforms per try (area, ratio, top, left)."""
    log_r = (math.log(RATIO[0]), math.log(RATIO[1]))
    for t in range(TRIES):
        ua, ur, ut, ul = u[4 * t: 4 * t + 4]
        area = h * w * (scale[0] + (scale[1] - scale[0]) * ua)
        ratio = math.exp(log_r[0] + (log_r[1] - log_r[0]) * ur)
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(ut * (h - ch + 1)), int(ul * (w - cw + 1)), ch, cw
    ratio = w / h  # fallback: the centre crop with the ratio clamped into range
    cw, ch = (w, round(w / RATIO[0])) if ratio < RATIO[0] else (round(h * RATIO[1]), h) if ratio > RATIO[1] else (w, h)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _erase_box(u: list[float], size: int) -> tuple[int, int, int, int] | None:
    log_r = (math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT))
    for t in range(TRIES):
        ua, ur, ut, ul = u[4 * t: 4 * t + 4]
        area = size * size * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * ua)
        ratio = math.exp(log_r[0] + (log_r[1] - log_r[0]) * ur)
        eh, ew = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if eh < size and ew < size:
            return int(ut * (size - eh + 1)), int(ul * (size - ew + 1)), eh, ew
    return None


class BatchAugment:
    """``(images uint8 (B, C, H, W), seeds) -> normalised float32 (B, C, S, S)``; see the module doc."""

    def __init__(self, data: DataConfig, aug: AugmentConfig, mean: tuple[float, ...], std: tuple[float, ...]):
        blocker = batch_augment_blocker(data, aug)
        if blocker:
            raise ConfigError(f"augment.engine=batch cannot run this recipe: {blocker}")
        self.size, self.scale, self.hflip, self.erase_p = data.img_size, tuple(aug.scale), aug.hflip, aug.random_erasing
        self.mode = MODES[data.interpolation]
        std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
        # x / 255 normalised in one multiply-add: x * gain + shift
        self.gain = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32)[:, None, None] / std_t

    def params(self, seed: int, channels: int, h: int, w: int) -> SampleParams:
        """Everything random about one sample, drawn from its own generator."""
        g = torch.Generator().manual_seed(int(seed))
        u = torch.rand(8 * TRIES + 2, generator=g, dtype=torch.float64).tolist()
        top, left, ch, cw = _crop_box(u[: 4 * TRIES], h, w, self.scale)
        flip = u[4 * TRIES] < self.hflip
        box = _erase_box(u[4 * TRIES + 2:], self.size) if u[4 * TRIES + 1] < self.erase_p else None
        noise = None if box is None else torch.randn(channels, box[2], box[3], generator=g)
        return SampleParams(top, left, ch, cw, flip, box, noise)

    def _theta(self, p: SampleParams, h: int, w: int) -> list[list[float]]:
        """grid_sample's affine map from output to the crop (align_corners=False: pixel centres)."""
        ax, ay = p.width / w, p.height / h
        bx, by = (2 * p.left + p.width) / w - 1, (2 * p.top + p.height) / h - 1
        return [[-ax if p.flip else ax, 0.0, bx], [0.0, ay, by]]

    def apply(self, images: torch.Tensor, params: list[SampleParams]) -> torch.Tensor:
        """Crop, resize, flip (one grid_sample), normalise and erase a batch with given parameters."""
        b, c, h, w = images.shape
        theta = torch.tensor([self._theta(p, h, w) for p in params], dtype=torch.float32)
        grid = F.affine_grid(theta, [b, c, self.size, self.size], align_corners=False)
        x = F.grid_sample(images.float(), grid, mode=self.mode, padding_mode="border", align_corners=False)
        x = torch.addcmul(self.shift, x, self.gain)
        for i, p in enumerate(params):
            if p.erase is not None:
                et, el, eh, ew = p.erase
                x[i, :, et: et + eh, el: el + ew] = p.noise
        return x

    def __call__(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        _, c, h, w = images.shape
        return self.apply(images, [self.params(s, c, h, w) for s in seeds])


def augment_one(augment: BatchAugment, image: torch.Tensor, seed: int) -> torch.Tensor:
    """The per-sample definition: one uint8 (C, H, W) image with its seed -> (C, S, S)."""
    c, h, w = image.shape
    return augment.apply(image[None], [augment.params(seed, c, h, w)])[0]
