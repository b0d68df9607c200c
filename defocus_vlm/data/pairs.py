"""Image-text pairs for stage 2 (CLIP): CSV / JSONL tables, Hugging Face datasets, webdataset tar
shards, and two built-in sets that need no download: Fashion-MNIST (or any labelled image dataset)
with templated class captions, and easy-VQA images with captions derived from their questions.

A *pair source* gives ``len``, ``load(i) -> (PIL image, caption)`` and ``where(i)`` (a path for
messages), like the classification sources of defocus_vlm/data/classification.py, so :class:`PairDataset` reuses
their corrupt-image policy and per-sample seeding (a sampled caption template is reproducible,
whatever the worker count)."""

from __future__ import annotations

import csv
import glob
import io
import json
import random
import tarfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from defocus_vlm.image_io import ImageError, load_image
from defocus_vlm.user_files import read_text

from .classification import ClassificationDataset, DataError, detect_source, open_source
from .easy_vqa import easy_vqa_phrases, is_colour_and_shape, read_split

PAIR_SOURCES = ("auto", "csv", "jsonl", "hf", "webdataset", "fashion_mnist", "easy_vqa", "labelled")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
# Fashion-MNIST class names as a caption says them (the dataset's own names are "T-shirt/top", ...)
FASHION_MNIST_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                       "ankle boot"]
# Caption templates: training samples one per image; evaluation uses the first.
FASHION_TEMPLATES = [
    "a photo of a {}.", "{}", "a {}.", "a picture of a {}.", "a black and white photo of a {}.",
    "a low resolution photo of a {}.", "a grey {} on a black background.", "an image of a {}.",
    "a small photo of the {}.", "this is a {}.", "a product photo of a {}.", "a blurry photo of a {}.",
]
EASY_VQA_TEMPLATES = [
    "a {}.", "a photo of a {}.", "a simple drawing of a {}.", "a {} on a white background.",
    "an image with a {}.", "there is a {} in the image.", "a picture of a {}.", "{}",
]


def check_templates(templates: Sequence[str], origin: str = "templates") -> list[str]:
    templates = list(templates)
    if not templates:
        raise DataError(f"{origin}: no caption templates")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise DataError(f"{origin}: every template needs exactly one '{{}}' for the class name, got {bad[0]!r}")
    return templates


def _check_caption(caption, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: the caption must be a non-empty string, got {caption!r}")
    return caption


# --------------------------------------------------------------------------- templated captions
class TemplatedPairs:
    """Captions made from a phrase per image: ``template.format(phrase)``. The source's
    ``load(i)`` gives ``(image, label)``; the phrase is ``names[label]`` (a labelled dataset) or the
    label itself when it is a string. ``sample``: a random template per image (training), else
    always the first (evaluation)."""

    def __init__(self, source, templates: Sequence[str], names: Sequence[str] | None = None, sample: bool = True):
        self.source, self.templates, self.sample = source, check_templates(templates), sample
        self.names = list(names) if names is not None else None
        self.classes = getattr(source, "classes", None)
        if self.names is not None and self.classes is not None and len(self.names) != len(self.classes):
            raise DataError(f"{len(self.names)} class names for {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.source)

    def where(self, i: int) -> str:
        return self.source.where(i)

    def phrase(self, label: int | str) -> str:
        return self.names[label] if self.names is not None else str(label)

    def load(self, i: int) -> tuple[Image.Image, str]:
        image, label = self.source.load(i)
        template = random.choice(self.templates) if self.sample else self.templates[0]
        return image, template.format(self.phrase(label))


class ImageFilePairs:
    """A pair source whose ``items`` are (image file, caption) pairs."""

    items: list[tuple[str, str]]
    classes = None

    def __len__(self) -> int:
        return len(self.items)

    def where(self, i: int) -> str:
        return self.items[i][0]

    def load(self, i: int) -> tuple[Image.Image, str]:
        path, caption = self.items[i]
        return load_image(path), caption


class EasyVQASource(ImageFilePairs):
    """easy-VQA images (64 px RGB, one coloured shape each) labelled with a phrase, "blue circle",
    read from the image's questions and answers: "what is the blue shape?" -> "rectangle" gives both
    words, "is there not a red shape?" -> "yes" rules red out. Where one attribute stays unknown the
    phrase names the other alone ("circle", "blue shape") if ``partial`` (training), else the image is
    left out (evaluation: every caption names one of the 24 colour-shape pairs); so are images with
    neither."""

    def __init__(self, split: str, partial: bool = True):
        rows, paths, _ = read_split(split)
        phrases = easy_vqa_phrases(*zip(*rows))
        self.items = [(paths[i], phrases[i]) for i in sorted(phrases)
                      if i in paths and (partial or is_colour_and_shape(phrases[i]))]
        if not self.items:
            raise DataError(f"easy-VQA {split}: no image could be captioned")


# --------------------------------------------------------------------------- files and datasets
class TablePairs(ImageFilePairs):
    """A CSV (header row) or JSONL file of (image path, caption) rows; relative image paths are
    relative to the file's folder."""

    def __init__(self, path: str | Path, image_column: str = "image", caption_column: str = "caption"):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"pairs file not found: {path}")
        rows = self._read(path)
        if not rows:
            raise DataError(f"{path} holds no rows")
        for col in (image_column, caption_column):
            if col not in rows[0][1]:
                raise DataError(f"{path}: no column {col!r}; columns are {sorted(rows[0][1])} "
                                f"(set data.image_column / data.caption_column)")
        self.items = []
        for where, row in rows:
            image = row.get(image_column)
            if not isinstance(image, str) or not image:
                raise DataError(f"{where}: the image path must be a non-empty string, got {image!r}")
            self.items.append((str(path.parent / image), _check_caption(row.get(caption_column), where)))

    @staticmethod
    def _read(path: Path) -> list[tuple[str, dict]]:
        """(where, row) per record; ``where`` names the file and line for messages."""
        if path.suffix.lower() == ".csv":
            return TablePairs._read_csv(path)
        text = read_text(path, "a JSONL file of image-caption objects")
        rows = []
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {n + 1}: not valid JSON: {err}") from err
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {n + 1}: expected a JSON object, got {type(row).__name__}")
                rows.append((f"{path} line {n + 1}", row))
        return rows

    @staticmethod
    def _read_csv(path: Path) -> list[tuple[str, dict]]:
        # Every field of every row is read: a row with more fields than the header (an unquoted comma in
        # a caption) is refused, where csv.DictReader would keep the first piece and drop the rest.
        reader = csv.reader(io.StringIO(read_text(path, "a CSV file with a header row"), newline=""))
        header = next(reader, None)
        if not header:
            return []
        rows = []
        for fields in reader:
            if not fields:  # a blank line
                continue
            where = f"{path} line {reader.line_num}"
            if len(fields) != len(header):
                raise DataError(f"{where}: {len(fields)} fields, but the header has {len(header)} ({header}); "
                                f'put a caption that contains commas in double quotes: "a cat, sitting"')
            rows.append((where, dict(zip(header, fields))))
        return rows


class HFPairs:
    """A ``datasets`` split with an image column (decoded by ``datasets``) and a caption column."""

    def __init__(self, ds, image_column: str, caption_column: str, origin: str):
        for col in (image_column, caption_column):
            if col not in ds.column_names:
                raise DataError(f"{origin}: no column {col!r}; columns are {ds.column_names} "
                                f"(set data.image_column / data.caption_column)")
        if len(ds) == 0:
            raise DataError(f"{origin}: the split is empty")
        self.ds, self.image_column, self.caption_column, self.origin = ds, image_column, caption_column, origin
        self.classes = None

    def __len__(self) -> int:
        return len(self.ds)

    def where(self, i: int) -> str:
        return f"{self.origin}[{i}]"

    def load(self, i: int) -> tuple[Image.Image, str]:
        try:
            row = self.ds[int(i)]
        except Exception as err:  # noqa: BLE001 - datasets decodes the image here; any failure is "corrupt"
            raise ImageError(f"cannot decode image {self.where(i)}: {err}") from err
        image = row[self.image_column]
        if isinstance(image, str):
            image = load_image(image)
        if not isinstance(image, Image.Image):
            raise ImageError(f"{self.where(i)}: unsupported image value {type(image).__name__}")
        return image, _check_caption(row[self.caption_column], self.where(i))


class TarPairs:
    """webdataset shards read with the standard library: files of one sample share a key (the name
    up to the first dot of the basename): ``0001.jpg`` + ``0001.txt``. ``path`` is a .tar file, a
    folder of them or a glob. Members are indexed once and read by offset, so access is random."""

    def __init__(self, path: str | Path):
        shards = self._shards(str(path))
        self.items: list[tuple[str, tuple[int, int], tuple[int, int], str]] = []
        for shard in shards:
            self.items.extend(self._index(shard))
        if not self.items:
            raise DataError(f"{path}: no samples with an image ({', '.join(IMAGE_EXTENSIONS)}) and a .txt caption")
        self.classes = None

    @staticmethod
    def _shards(path: str) -> list[str]:
        p = Path(path)
        shards = sorted(str(s) for s in p.glob("*.tar")) if p.is_dir() else sorted(glob.glob(path))
        if not shards:
            raise DataError(f"no tar shards found at {path} (expected a .tar file, a folder of .tar files or a glob)")
        return shards

    @staticmethod
    def _index(shard: str) -> list:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:  # uncompressed only: members are read by offset
                for member in tar:
                    if member.isfile():
                        folder, _, base = member.name.rpartition("/")
                        key, _, ext = base.partition(".")
                        samples.setdefault(f"{folder}/{key}", {})[ext.lower()] = member
        except tarfile.TarError as err:
            raise DataError(f"cannot read tar shard {shard}: {err} (compressed shards are not supported)") from err
        items = []
        for files in samples.values():
            # the image is the member whose last suffix is an image type ("jpg", "seg.png", ...)
            image_ext = next((e for e in files if e.rpartition(".")[2] in IMAGE_EXTENSIONS), None)
            if image_ext is not None and "txt" in files:
                image, text = files[image_ext], files["txt"]
                items.append((shard, (image.offset_data, image.size), (text.offset_data, text.size),
                              f"{shard}:{image.name}"))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def where(self, i: int) -> str:
        return self.items[i][3]

    def load(self, i: int) -> tuple[Image.Image, str]:
        shard, (img_at, img_size), (txt_at, txt_size), where = self.items[i]
        with open(shard, "rb") as f:
            f.seek(img_at)
            raw = f.read(img_size)
            f.seek(txt_at)
            caption = f.read(txt_size).decode("utf-8", errors="replace").strip()
        try:
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                image = img.copy()
        except Exception as err:  # noqa: BLE001 - any decoder failure is "corrupt"
            raise ImageError(f"cannot decode image {where}: {err}") from err
        return image, _check_caption(caption, where)


def detect_pair_source(path: str) -> str:
    if path.replace("-", "_") == "easy_vqa":
        return "easy_vqa"
    p = Path(path)
    if p.is_file() or not p.exists():
        suffix = p.suffix.lower()
        if suffix == ".csv":
            return "csv"
        if suffix in (".jsonl", ".json"):
            return "jsonl"
        if suffix == ".tar" or glob.glob(path):
            return "webdataset"
        raise DataError(f"pairs not found at {path} (expected a .csv / .jsonl file, tar shards, a dataset folder, "
                        f"a Fashion-MNIST folder or 'easy_vqa')")
    if any(p.glob("*.tar")):
        return "webdataset"
    kind = detect_source(p)
    return {"imagefolder": "labelled"}.get(kind, kind)


def open_pairs(
    source: str,
    path: str | Path,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "caption",
    templates: Sequence[str] | None = None,
    sample_templates: bool = True,
) -> TablePairs | TarPairs | TemplatedPairs | HFPairs:
    """Open one split of image-text pairs, or raise DataError with the path and the reason.

    File sources (csv, jsonl, webdataset) are one split each: ``split`` is ignored. Labelled
    sources (fashion_mnist, or "labelled": any image-folder / HF classification dataset) get
    captions from ``templates`` and their class names; easy_vqa gets captions from its questions."""
    if source not in PAIR_SOURCES:
        raise DataError(f"unknown pair source {source!r}; expected one of {', '.join(PAIR_SOURCES)}")
    path = str(path)
    if source == "auto":
        source = detect_pair_source(path)
    if source in ("csv", "jsonl"):
        return TablePairs(path, image_column, caption_column)
    if source == "webdataset":
        return TarPairs(path)
    if source == "easy_vqa":  # partial captions ("a circle.") for training only
        return TemplatedPairs(EasyVQASource(split, partial=split == "train"), templates or EASY_VQA_TEMPLATES,
                              sample=sample_templates)
    if source == "fashion_mnist":
        labelled = open_source("fashion_mnist", path, split)
        names = FASHION_MNIST_NAMES if len(labelled.classes) == len(FASHION_MNIST_NAMES) else labelled.classes
        return TemplatedPairs(labelled, templates or FASHION_TEMPLATES, names, sample_templates)
    if source == "labelled":
        labelled = open_source("auto", path, split, image_column)
        return TemplatedPairs(labelled, templates or FASHION_TEMPLATES[:1], labelled.classes, sample_templates)
    import datasets

    datasets.disable_progress_bars()
    try:
        p = Path(path)
        saved = p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "dataset_info.json").is_file())
        dd = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
    except Exception as err:  # noqa: BLE001 - report whatever datasets found wrong, with the path
        raise DataError(f"cannot load dataset {path}: {err}") from err
    if isinstance(dd, datasets.DatasetDict):
        if split not in dd:
            raise DataError(f"{path}: no split {split!r}; splits are {list(dd)}")
        dd = dd[split]
    return HFPairs(dd, image_column, caption_column, path)


class PairDataset(ClassificationDataset):
    """Items are ``(pixel_values, caption, skipped)`` (the classification dataset's corrupt-image
    policy and per-sample seeding, with a caption where the label was)."""


class PairCollator:
    """Stacks images and tokenizes captions: ``{"pixel_values", "input_ids", "attention_mask",
    "skipped"}`` (captions longer than ``max_length`` tokens are truncated)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list) -> dict:
        pixels, captions, skipped = zip(*items)
        text = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        return {"pixel_values": torch.stack(pixels), "input_ids": text["input_ids"],
                "attention_mask": text["attention_mask"], "skipped": int(sum(skipped))}
