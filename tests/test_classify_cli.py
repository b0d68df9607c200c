"""``defocus-vlm classify``: labels and probabilities; grey / RGBA / CMYK / 16-bit / palette
images converted; unreadable, missing and huge images refused with a clear message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from defocus_vlm.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from defocus_vlm import DefocusImageProcessor, DefocusVisionConfig, DefocusVisionForImageClassification

    path = tmp_path_factory.mktemp("m")
    cfg = DefocusVisionConfig.from_preset(
        "defocus_vit_tiny",
        num_labels=3,
        img_size=28,
        patch_size=7,
        in_chans=3,
        embed_dim=16,
        depth=1,
        num_heads=2,
        id2label={0: "cat", 1: "dog", 2: "fox"},
        label2id={"cat": 0, "dog": 1, "fox": 2},
    )
    DefocusVisionForImageClassification(cfg).save_pretrained(path)
    DefocusImageProcessor(size=28, crop_pct=0.875).save_pretrained(path)
    return path


def _images(tmp):
    rng = np.random.default_rng(0)
    files = {}
    files["grey.png"] = Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), "L")
    files["rgba.png"] = Image.fromarray(rng.integers(0, 255, (30, 50, 4), dtype=np.uint8), "RGBA")
    files["cmyk.jpg"] = Image.new("CMYK", (33, 33), (10, 200, 30, 40))
    files["deep16.png"] = Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16))
    files["palette.gif"] = Image.new("P", (20, 20), 3)
    paths = []
    for name, img in files.items():
        img.save(tmp / name)
        paths.append(str(tmp / name))
    return paths


def test_classify_modes(model_dir, tmp_path, capsys):
    paths = _images(tmp_path)
    assert Image.open(paths[3]).mode.startswith("I")  # really 16-bit on disk
    assert main(["classify", "--model", str(model_dir), *paths, "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    for p in paths:
        assert p in out
    probs = [float(line.split()[0]) for line in out.splitlines() if line.startswith("  ")]
    assert len(probs) == 2 * len(paths) and all(0 <= p <= 1 for p in probs)
    assert any(name in out for name in ("cat", "dog", "fox"))


def test_classify_refuses_bad_images(model_dir, tmp_path, capsys, monkeypatch):
    import defocus_vlm.image_io as image_io

    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "huge.png")
    good = _images(tmp_path)[0]
    monkeypatch.setattr(image_io, "MAX_PIXELS", 2000)  # 64x64 counts as huge here
    rc = main(
        [
            "classify",
            "--model",
            str(model_dir),
            str(tmp_path / "junk.png"),
            str(tmp_path / "missing.png"),
            str(tmp_path / "huge.png"),
            good,
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1
    assert "junk.png: error: cannot read image" in captured.err
    assert "missing.png: error: " in captured.err and "missing.png not found, expected an image file" in captured.err
    assert "huge.png: error: image too large" in captured.err
    assert good in captured.out  # the good image is still classified


def test_imagenet_names_for_1000_class_models():
    from transformers import PretrainedConfig

    from defocus_vlm.commands.classify import class_names

    cfg = PretrainedConfig(num_labels=1000)
    names = class_names(cfg)
    assert len(names) == 1000 and names[0] != "LABEL_0" and "goldfish" in names[1].lower()
    custom = PretrainedConfig(id2label={0: "a", 1: "b"})
    assert class_names(custom) == ["a", "b"]
