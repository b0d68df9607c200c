"""Turning whatever a user passes (path, PIL, NumPy, tensor) into a clean RGB or grey PIL image,
with one clear error for what cannot be used."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .user_files import existing_file

MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit, made explicit


class ImageError(ValueError):
    """An image that cannot be used, with the reason."""


def load_image(path: str | os.PathLike) -> Image.Image:
    path = existing_file(path, "an image file", ImageError)
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"image too large: {path} is {w}x{h} pixels (limit {MAX_PIXELS})")
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot read image {path}: {err}") from err


# Integer formats with a fixed range: a value is read against the range of its format, never against the
# image's own peak (a dark 16-bit scan stays dark, a 0/1 mask stays near black), as torchvision scales them.
_INT_RANGES = {("u", 1): 255, ("u", 2): 65535}  # (dtype kind, bytes) -> range, any byte order
FLOAT_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding; more than this is refused


def _array_to_pil(arr: np.ndarray, int_range: int | None = None) -> Image.Image:
    """HxW, HxWxC or CxHxW array -> 8-bit PIL image. uint8 is taken as is, uint16 scaled from 0..65535,
    bool as 0/255, floats from [0, 1]; other integer types must hold 8-bit values (0..255), unless
    ``int_range`` gives their format's range (PIL's 32-bit "I" mode holds 16-bit data)."""
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(f"an image array must be HxW, HxWx{{1,3,4}} or CxHxW, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    if arr.dtype == np.bool_:
        return Image.fromarray(arr.astype(np.uint8) * 255)
    if np.issubdtype(arr.dtype, np.integer):
        scale = int_range or _INT_RANGES.get((arr.dtype.kind, arr.dtype.itemsize), 255)
        low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if low < 0 or high > scale:
            raise ImageError(f"{arr.dtype} image values must lie in 0..{scale}, got {low}..{high} "
                             f"(use uint8 for 8-bit, uint16 for 16-bit data, or floats in [0, 1])")
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("image array contains NaN or infinite values")
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if low < -FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
            raise ImageError(f"float image values must lie in [0, 1], got {low:g}..{high:g} "
                             f"(divide 8-bit data by 255 and 16-bit data by 65535 first)")
        scale = 1.0
    else:
        raise ImageError(f"unsupported image array type {arr.dtype}")
    return Image.fromarray(np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))


def to_pil(image: Image.Image | np.ndarray | torch.Tensor | str | os.PathLike, channels: int = 3) -> Image.Image:
    """Convert to mode "RGB" (channels=3) or "L" (channels=1).

    Grey, palette, RGBA/LA (alpha composited on white), CMYK, 16-bit and float images are
    converted; anything else is refused with a clear message.
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if torch.is_tensor(image):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image, array, tensor or path, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # "I" (32-bit) is how Pillow hands over 16-bit PNG/TIFF data, so it is read against 0..65535 too
        image = _array_to_pil(np.asarray(image), int_range=65535)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    target = "RGB" if channels == 3 else "L"
    if channels not in (1, 3):
        raise ImageError(f"only 1- or 3-channel models are supported, got {channels}")
    return image.convert(target)
