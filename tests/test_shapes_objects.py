"""The tower comparison's extra data (``defocus-vlm data shapes-vqa --objects --blank``): stage 1's object
images show exactly one scene object each, where it stands, labelled with its colour, shape and size, and
never a held-out combination; the blind baseline's blank canvases stand under every image's name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defocus_vlm.cli import main
from defocus_vlm.data.shapes_objects import BLANK_GRAY, object_classes
from defocus_vlm.data.shapes_vqa import COLORS, HELD_OUT_COMBINATIONS, SPLITS, ShapesVQAConfig, make_scene, shape_mask

SMALL = ["--images", "240", "--test-images", "80", "--questions-per-image", "4"]  # as test_shapes_vqa.py
CONFIG = ShapesVQAConfig(images=240, test_images=80, questions_per_image=4)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "set"
    assert main(["data", "shapes-vqa", "--output-dir", str(out), *SMALL, "--objects", "--blank"]) == 0
    return out


def test_object_images_show_one_labelled_object_in_place(export):
    for folder, split in (("train", "train"), ("val", "test")):
        files = sorted((export / "objects" / folder).glob("*/*.png"))
        scenes = [make_scene(CONFIG, split, i) for i in range(CONFIG.split_images(split))]
        assert len(files) == sum(len(s.objects) for s in scenes)  # every object of every scene, once
        for path in files:
            index, k = map(int, path.stem.split("_"))
            obj = scenes[index].objects[k]
            assert path.parent.name == f"{obj.color}_{obj.shape}_{obj.size}"
            pixels = np.asarray(Image.open(path).convert("RGB"))
            coloured = (pixels == COLORS[obj.color]).all(axis=2)
            assert (coloured == shape_mask(obj, CONFIG.img_size)).all(), path  # this object, nothing else
    labels = {p.name for p in (export / "objects" / "train").iterdir()}
    assert labels <= set(object_classes()) and len(object_classes()) == 40
    assert not any(f"{c}_{s}_" in label for c, s in HELD_OUT_COMBINATIONS for label in labels)


def test_blank_images_mirror_the_export(export):
    for split in SPLITS:
        images = sorted(p.name for p in (export / "images" / split).glob("*.png"))
        blanks = sorted((export / "blank" / split).glob("*.png"))
        assert images and [p.name for p in blanks] == images
        pixels = np.asarray(Image.open(blanks[0]).convert("RGB"))
        assert pixels.shape == (CONFIG.img_size, CONFIG.img_size, 3) and (pixels == BLANK_GRAY).all()
