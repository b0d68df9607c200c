"""The data of the shapes-VQA tower comparison besides the benchmark itself (``defocus-vlm data shapes-vqa
--output-dir DIR --objects --blank``): stage 1's objects and the blind baseline's blank images.

``DIR/objects/{train,val}/<colour>_<shape>_<size>/<scene>_<k>.png``: the objects of the shapes-VQA scenes,
one per image, as an image-folder classification set.

Each image is a scene's canvas (its background) with only its k-th object drawn, where it stands in the
scene and at its size; the label is the object's colour, shape and size (40 classes: the 20 seen
colour-shape pairs x 2 sizes). Why this label: every question type is answered from those three
attributes and the objects' positions, so a tower that tells them apart anywhere on the canvas has
the features stage 3 needs, learnt in minutes; and the label needs no context beyond the object, so
stage 1 itself gives a non-causal tower no head start (where the whole image matters is stage 3).
train comes from the train scenes, val from the test scenes; neither has a held-out combination, so
test_unseen stays unseen by the tower too.

``DIR/blank/<split>/<index>.png``: one plain grey canvas under the name of every image of the export.
The blind baseline is the same recipe reading these (``data.image_folder``, ``eval vqa --image-dir``):
the same model, image tokens and budget, only the pixels carry nothing, so what it learns is the
answer given the question's words alone."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from PIL import Image

from .shapes_vqa import SEEN_COMBINATIONS, SIZES, SPLITS, Scene, ShapeObject, ShapesVQAConfig, make_scene, render

BLANK_GRAY = 220  # the middle of the scenes' background greys (200-240)
OBJECT_SPLITS = {"train": "train", "val": "test"}  # classification split -> the shapes-VQA split it is drawn from


def object_label(obj: ShapeObject) -> str:
    return f"{obj.color}_{obj.shape}_{obj.size}"


def object_classes() -> list[str]:
    """Every label a set can have, in a fixed order (the image folder sorts its class names itself)."""
    return sorted(f"{c}_{s}_{z}" for c, s in SEEN_COMBINATIONS for z in SIZES)


def object_scene(scene: Scene, k: int) -> Scene:
    """``scene`` with its k-th object alone."""
    return replace(scene, objects=(scene.objects[k],))


def write_objects(out: str | os.PathLike, config: ShapesVQAConfig) -> dict[str, int]:
    """Write every object of every scene of train (and test, as val) under ``out/objects``; images per split."""
    root = Path(out) / "objects"
    counts = {}
    for name, split in OBJECT_SPLITS.items():
        counts[name] = 0
        for index in range(config.split_images(split)):
            scene = make_scene(config, split, index)
            for k, obj in enumerate(scene.objects):
                folder = root / name / object_label(obj)
                folder.mkdir(parents=True, exist_ok=True)
                render(object_scene(scene, k)).save(folder / f"{index:05d}_{k}.png", format="PNG")
                counts[name] += 1
    return counts


def write_blank(out: str | os.PathLike, config: ShapesVQAConfig) -> int:
    """A blank canvas for every image under ``out/images`` (written first), at the same path under
    ``out/blank``; the number written."""
    out = Path(out)
    blank = Image.new("RGB", (config.img_size, config.img_size), (BLANK_GRAY,) * 3)
    count = 0
    for split in SPLITS:
        for path in sorted((out / "images" / split).glob("*.png")):
            target = out / "blank" / split / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            blank.save(target, format="PNG")
            count += 1
    return count
