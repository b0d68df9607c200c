"""Training / evaluation data: Fashion-MNIST IDX files, Hugging Face ``imagefolder`` trees and any
local dataset with image and label columns, checked before training starts.

A *source* gives ``len``, ``load(i) -> (PIL image, label)``, ``where(i)`` (a path for messages)
and ``classes``. :class:`ClassificationDataset` adds the transform, the corrupt-image policy and
a per-sample seed, so augmentation is reproducible whatever the worker count (exact resume)."""

from __future__ import annotations

import gzip
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from defocus_vlm.image_io import ImageError, load_image

# Where Debian's dataset-fashion-mnist package puts the IDX files (the Makefile installs it).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_ALIASES = {
    "val": ("val", "validation", "test"),
    "validation": ("validation", "val", "test"),
    "test": ("test", "validation", "val"),
    "train": ("train",),
}


class DataError(ValueError):
    """Missing, empty or unreadable data, with the path and the reason."""


# --------------------------------------------------------------------------- IDX (Fashion-MNIST)
def _idx_path(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file missing: {root / (stem + '.gz')} (install the Debian package "
        f"dataset-fashion-mnist with `make data`, or point data.path at the IDX files)"
    )


def read_idx(path: Path, kind: str) -> np.ndarray:
    """kind "images" -> (N, H, W) uint8; "labels" -> (N,) int64. Checks the IDX magic and size."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    magic, ndim = (2051, 3) if kind == "images" else (2049, 1)
    if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX {kind} file (bad magic number)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {len(raw) - offset} bytes of data")
    if dims[0] == 0:
        raise DataError(f"{path} holds no samples")
    arr = np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)
    return arr if kind == "images" else arr.astype(np.int64)


class IdxSource:
    def __init__(self, root: str | Path, split: str):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"Fashion-MNIST directory not found: {root}")
        key = "train" if split == "train" else "val"
        img_path, lbl_path = (_idx_path(root, s) for s in _IDX_FILES[key])
        self.images, self.labels = read_idx(img_path, "images"), read_idx(lbl_path, "labels")
        if len(self.images) != len(self.labels):
            raise DataError(
                f"{img_path} has {len(self.images)} images but {lbl_path} has {len(self.labels)} labels"
            )
        self.path = img_path
        self.classes = (
            list(FASHION_MNIST_CLASSES)
            if self.labels.max() < 10
            else [str(i) for i in range(int(self.labels.max()) + 1)]
        )

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L"), int(self.labels[i])

    def where(self, i: int) -> str:
        return f"{self.path}[{i}]"


# --------------------------------------------------------------------------- Hugging Face datasets
class HFSource:
    """Rows of a ``datasets.Dataset`` with an image column (decoded lazily so that one corrupt
    file is reported with its path instead of failing the whole batch) and an integer label."""

    def __init__(self, ds, image_column: str, label_column: str, origin: str):
        import datasets

        for col in (image_column, label_column):
            if col not in ds.column_names:
                raise DataError(
                    f"{origin}: no column {col!r}; columns are {ds.column_names} "
                    f"(set data.image_column / data.label_column)"
                )
        if len(ds) == 0:
            raise DataError(f"{origin}: the split is empty")
        feature = ds.features[image_column]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        label_feature = ds.features[label_column]
        if isinstance(label_feature, datasets.ClassLabel):
            self.classes = list(label_feature.names)
        else:
            labels = ds[label_column]
            if not all(isinstance(v, (int, np.integer)) for v in labels[:1000]):
                raise DataError(f"{origin}: column {label_column!r} must hold integer class indices")
            self.classes = [str(i) for i in range(int(max(labels)) + 1)]
        self.ds, self.image_column, self.label_column, self.origin = ds, image_column, label_column, origin

    def __len__(self) -> int:
        return len(self.ds)

    def _raw(self, i: int):
        return self.ds[int(i)][self.image_column]

    def where(self, i: int) -> str:
        raw = self._raw(i)
        if isinstance(raw, dict) and raw.get("path"):
            return str(raw["path"])
        return f"{self.origin}[{i}]"

    def load(self, i: int) -> tuple[Image.Image, int]:
        row = self.ds[int(i)]
        raw, label = row[self.image_column], int(row[self.label_column])
        if isinstance(raw, Image.Image):
            return raw, label
        if isinstance(raw, dict):
            if raw.get("bytes") is not None:
                try:
                    with Image.open(io.BytesIO(raw["bytes"])) as img:
                        img.load()
                        return img.copy(), label
                except Exception as err:  # noqa: BLE001 - any decoder failure is "corrupt"
                    raise ImageError(
                        f"cannot decode image {raw.get('path') or f'{self.origin}[{i}]'}: {err}"
                    ) from err
            if raw.get("path"):
                return load_image(raw["path"]), label
        if isinstance(raw, str):
            return load_image(raw), label
        raise ImageError(f"{self.origin}[{i}]: unsupported image value {type(raw).__name__}")


def _pick_split(dd, split: str, origin: str):
    for name in _SPLIT_ALIASES.get(split, (split,)):
        if name in dd:
            return dd[name]
    raise DataError(f"{origin}: no split {split!r}; splits are {list(dd)}")


def detect_source(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    if p.is_dir() and (any(p.glob("*-idx3-ubyte.gz")) or any(p.glob("*-idx3-ubyte"))):
        return "fashion_mnist"
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "dataset_info.json").is_file()):
        return "hf"
    if p.is_dir():
        return "imagefolder"
    raise DataError(
        f"data path {p} is a file; expected a directory (IDX files, image class folders "
        f"or a datasets.save_to_disk directory)"
    )


def open_source(
    source: str, path: str | Path, split: str, image_column: str = "image", label_column: str = "label"
) -> IdxSource | HFSource:
    """Open one split, or raise DataError with the path and the reason."""
    path = Path(path)
    if source == "auto":
        source = detect_source(path)
    if source == "fashion_mnist":
        return IdxSource(path, split)
    import datasets

    datasets.disable_progress_bars()
    if source == "imagefolder":
        if not path.is_dir():
            raise DataError(f"image folder not found: {path}")
        sub = [d for d in path.iterdir() if d.is_dir()]
        if not sub:
            raise DataError(
                f"image folder {path} is empty: expected {path}/<split>/<class>/<image> "
                f"or {path}/<class>/<image>"
            )
        try:
            dd = datasets.load_dataset("imagefolder", data_dir=str(path))
        except Exception as err:  # noqa: BLE001 - report whatever datasets found wrong, with the path
            raise DataError(f"cannot read image folder {path}: {err}") from err
        if (
            isinstance(dd, datasets.DatasetDict)
            and len(dd) == 1
            and split not in dd
            and not any(a in dd for a in _SPLIT_ALIASES.get(split, ()))
        ):
            raise DataError(f"{path}: no split {split!r}; splits are {list(dd)}")
        return HFSource(_pick_split(dd, split, str(path)), image_column, label_column, str(path))
    if source == "hf":
        try:
            dd = (
                datasets.load_from_disk(str(path))
                if path.is_dir()
                and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file())
                else datasets.load_dataset(str(path))
            )
        except Exception as err:  # noqa: BLE001
            raise DataError(f"cannot load dataset {path}: {err}") from err
        ds = _pick_split(dd, split, str(path)) if isinstance(dd, datasets.DatasetDict) else dd
        return HFSource(ds, image_column, label_column, str(path))
    raise DataError(f"unknown data source {source!r}")


def verify_source(source: Any, count: int, split: str, on_corrupt: str = "skip", limit: int = 0) -> None:
    """Decode images of ``split`` before training: all of them when the set (its first ``limit`` samples
    when a limit is set) holds at most ``count`` (-1 = all), else ``count`` spread evenly over it. With
    ``on_corrupt="fail"`` any unreadable one is a DataError now, not when training reaches it; with
    "skip" a warning says how many (an error when none can be read)."""
    total = min(limit, len(source)) if limit else len(source)
    n = total if count < 0 else min(count, total)
    indices = np.unique(np.linspace(0, total - 1, n).round().astype(int)) if n else np.zeros(0, int)
    bad = []
    for i in indices:
        try:
            source.load(int(i))
        except (ImageError, OSError) as err:
            bad.append(f"{source.where(int(i))}: {err}")
    checked = f"{len(indices)} checked" if len(indices) < total else f"all {total}"
    if bad and on_corrupt == "fail":
        raise DataError(f"{split} split: {len(bad)} of {checked} images cannot be read (first: {bad[0]}); fix or "
                        f"remove them, or set data.on_corrupt=skip to train without them")
    if bad and len(bad) == len(indices):
        raise DataError(f"{split} split: none of the {len(indices)} checked images can be read; first: {bad[0]}")
    if bad:
        from warnings import warn

        warn(f"{split} split: {len(bad)} of {checked} images are unreadable and will be skipped "
             f"(data.on_corrupt=skip; first: {bad[0]})", stacklevel=2)


class ClassificationDataset(Dataset):
    """Items are ``(pixel_values, label, skipped)``. The index may be ``(i, seed)``: the transform's
    randomness (python, NumPy, torch) is then seeded per sample and the caller's RNG is untouched."""

    def __init__(self, source, transform, on_corrupt: str = "skip", limit: int = 0):
        self.source, self.transform, self.on_corrupt = source, transform, on_corrupt
        self.length = min(limit, len(source)) if limit else len(source)
        self.classes = source.classes

    def __len__(self) -> int:
        return self.length

    def _load(self, i: int):
        tries = 0
        while True:
            try:
                img, label = self.source.load(i)
                return img, label, tries
            except (ImageError, OSError) as err:
                if self.on_corrupt == "fail":
                    raise DataError(
                        f"corrupt image {self.source.where(i)}: {err} "
                        f"(set data.on_corrupt=skip to skip such files)"
                    ) from err
                tries += 1
                if tries >= min(100, self.length):
                    raise DataError(
                        f"{tries} consecutive unreadable images, last {self.source.where(i)}"
                    ) from err
                i = (i + 1) % self.length

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        if seed is None:
            img, label, skipped = self._load(int(i))
            return self.transform(img), label, skipped
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
                img, label, skipped = self._load(int(i))
                return self.transform(img), label, skipped
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
