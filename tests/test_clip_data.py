"""Image-text pair sources: CSV / JSONL, webdataset tar shards, Hugging Face datasets, templated
Fashion-MNIST captions, easy-VQA captions derived from questions; clear errors for bad data."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from defocus_vlm.data.classification import DataError
from defocus_vlm.data.pairs import (
    FASHION_TEMPLATES,
    PairCollator,
    PairDataset,
    TemplatedPairs,
    easy_vqa_phrases,
    open_pairs,
)
from defocus_vlm.processing_clip import byte_level_tokenizer

torch.set_num_threads(1)
FASHION = "/usr/share/datasets/fashion-mnist"


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _images(folder, n=3):
    folder.mkdir()
    for i in range(n):
        (folder / f"{i}.png").write_bytes(_png(10 * i))


def test_csv_and_jsonl_pairs_with_relative_paths(tmp_path):
    _images(tmp_path / "img")
    (tmp_path / "pairs.csv").write_text("image,caption\nimg/0.png,a dark square\nimg/2.png,\"a grey, square\"\n")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"file": "img/1.png", "text": "one"}) + "\n\n" + json.dumps({"file": "img/0.png", "text": "two"}))
    csv_pairs = open_pairs("auto", tmp_path / "pairs.csv")
    assert len(csv_pairs) == 2 and csv_pairs.load(1)[1] == "a grey, square"
    assert np.asarray(csv_pairs.load(1)[0])[0, 0, 0] == 20
    jsonl = open_pairs("jsonl", tmp_path / "pairs.jsonl", image_column="file", caption_column="text")
    assert [jsonl.load(i)[1] for i in range(2)] == ["one", "two"]
    with pytest.raises(DataError, match="no column 'caption'.*data.caption_column"):
        open_pairs("jsonl", tmp_path / "pairs.jsonl", image_column="file")
    (tmp_path / "empty_caption.csv").write_text("image,caption\nimg/0.png,  \n")
    with pytest.raises(DataError, match="empty_caption.csv line 2: the caption must be a non-empty string"):
        open_pairs("csv", tmp_path / "empty_caption.csv")
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(DataError, match="line 1: not valid JSON"):
        open_pairs("jsonl", tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="pairs file not found"):
        open_pairs("csv", tmp_path / "missing.csv")


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_read_with_tarfile(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "000.tar", [("a/0001.png", _png(5)), ("a/0001.txt", b"first\n"),
                                 ("a/0002.txt", b"caption without an image")])
    _shard(shards / "001.tar", [("0003.seg.png", _png(7)), ("0003.txt", "d\u00e9j\u00e0 vu".encode())])
    pairs = open_pairs("auto", shards)
    assert len(pairs) == 2
    assert pairs.load(0)[1] == "first" and np.asarray(pairs.load(0)[0])[0, 0, 0] == 5
    assert pairs.load(1)[1] == "d\u00e9j\u00e0 vu" and pairs.where(1).endswith("001.tar:0003.seg.png")
    assert len(open_pairs("webdataset", str(shards / "00*.tar"))) == 2
    with pytest.raises(DataError, match="no tar shards"):
        open_pairs("webdataset", str(tmp_path / "none-*.tar"))
    _shard(tmp_path / "captions_only.tar", [("x.txt", b"no image")])
    with pytest.raises(DataError, match="no samples with an image"):
        open_pairs("webdataset", tmp_path / "captions_only.tar")


def test_hf_dataset_pairs(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (1, 2)]
    ds = datasets.Dataset.from_dict({"image": images, "caption": ["one", "two"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    pairs = open_pairs("auto", tmp_path / "ds", "train")
    assert len(pairs) == 2 and pairs.load(1)[1] == "two" and np.asarray(pairs.load(1)[0])[0, 0, 0] == 2
    with pytest.raises(DataError, match="no split 'val'"):
        open_pairs("hf", tmp_path / "ds", "val")


def test_fashion_mnist_templated_captions_are_seeded_per_sample():
    evaluation = open_pairs("fashion_mnist", FASHION, "val", sample_templates=False)
    image, caption = evaluation.load(0)
    assert caption == FASHION_TEMPLATES[0].format("ankle boot")  # test image 0 is an ankle boot
    assert image.size == (28, 28) and evaluation.names[0] == "t-shirt"
    train = open_pairs("fashion_mnist", FASHION, "train", templates=["a {}", "the {}!"])
    ds = PairDataset(train, lambda img: torch.zeros(1), limit=50)
    captions = [ds[(i, 1000 + i)][1] for i in range(50)]
    assert captions == [ds[(i, 1000 + i)][1] for i in range(50)]  # same seed, same template
    assert {c.split()[0] for c in captions} == {"a", "the"}
    with pytest.raises(DataError, match="exactly one"):
        TemplatedPairs(train.source, ["no slot"])


def test_easy_vqa_phrases_from_questions():
    questions = [
        ("what is the blue shape?", "rectangle", 0),  # both words at once
        ("what color is the shape?", "red", 1), ("is there a circle?", "no", 1), ("is no triangle present?", "yes", 1),
        ("does the image contain a teal shape?", "no", 2), ("what shape is in the image?", "circle", 2),
        ("is there not a red shape?", "yes", 3),  # nothing positive is known
    ]
    phrases = easy_vqa_phrases(*zip(*questions))
    # image 1: circle and triangle ruled out -> rectangle; image 2: colour unknown
    assert phrases == {0: "blue rectangle", 1: "red rectangle", 2: "circle"}


def test_easy_vqa_test_split_and_collator():
    pairs = open_pairs("auto", "easy-vqa", "test", sample_templates=False)
    assert 850 <= len(pairs) <= 1000
    assert len({phrase for _, phrase in pairs.source.items}) == 24  # evaluation: 8 colours x 3 shapes, all named
    image, caption = pairs.load(0)
    assert image.size == (64, 64) and caption.startswith("a ") and caption.endswith(".")
    train = open_pairs("easy_vqa", "easy_vqa", "train")
    assert len(train) > 3900 and "circle" in {phrase for _, phrase in train.source.items}  # partial captions too
    collate = PairCollator(byte_level_tokenizer(), max_length=6)
    batch = collate([(torch.zeros(1, 4, 4), "a red circle.", 0), (torch.ones(1, 4, 4), "a", 1)])
    assert batch["pixel_values"].shape == (2, 1, 4, 4) and batch["skipped"] == 1
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0]
    with pytest.raises(DataError, match="splits train and test"):
        open_pairs("easy_vqa", "easy_vqa", "dev")
    with pytest.raises(DataError, match="unknown pair source"):
        open_pairs("coco", "x")
