"""Zero-shot and retrieval metrics against hand-worked cases; class names, templates and CLI errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from defocus_vlm.eval.retrieval import group_pairs, recall_at_k, retrieval_metrics
from defocus_vlm.eval.zeroshot import load_classnames, load_templates, text_classifier
from transformers.modeling_outputs import BaseModelOutputWithPooling

torch.set_num_threads(1)


def test_recall_at_k_hand_worked():
    scores = torch.tensor([[0.9, 0.1, 0.5],   # ranking 0, 2, 1
                           [0.2, 0.2, 0.8],   # ranking 2, then tie 0/1 -> lower index first
                           [0.1, 0.3, 0.2]])  # ranking 1, 2, 0
    positives = torch.tensor([[False, False, True], [False, True, False], [True, True, False]])
    assert recall_at_k(scores, positives, (1, 2, 3)) == {1: 1, 2: 2, 3: 3}  # query 2 has two right answers
    assert recall_at_k(scores, positives, (10,)) == {10: 3}  # k capped at the candidate count
    with pytest.raises(ValueError, match="same"):
        recall_at_k(scores, positives[:2])


def test_group_pairs_merges_identical_images_and_captions():
    keys = ["a.png", "a.png", "b.png", "c.png"]
    captions = ["a cat", "a kitten", "a cat", "a dog"]
    first, texts, positives = group_pairs(keys, captions)
    assert first == [0, 2, 3] and texts == ["a cat", "a kitten", "a dog"]
    assert positives.tolist() == [[True, True, False], [True, False, False], [False, False, True]]


def test_retrieval_metrics_on_hand_made_embeddings():
    eye = torch.eye(3)
    perfect = retrieval_metrics(eye, eye, torch.eye(3, dtype=torch.bool), ks=(1, 5))
    assert perfect == {"images": 3, "texts": 3, "i2t_r1": 100.0, "i2t_r5": 100.0, "t2i_r1": 100.0, "t2i_r5": 100.0}
    swapped = retrieval_metrics(eye, eye[[1, 0, 2]], torch.eye(3, dtype=torch.bool), ks=(1, 2))
    assert swapped["i2t_r1"] == pytest.approx(100 / 3, abs=1e-4) and swapped["i2t_r2"] == 100.0
    assert swapped["t2i_r1"] == pytest.approx(100 / 3, abs=1e-4)


class _BagOfLetters(torch.nn.Module):
    """A stand-in text tower: the embedding counts the letters a, b, c of each prompt."""

    def get_text_features(self, input_ids, attention_mask):
        return BaseModelOutputWithPooling(pooler_output=input_ids.float())


class _LetterTokenizer:
    def __call__(self, texts, **_):
        ids = torch.tensor([[t.count(c) for c in "abc"] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_text_classifier_ensembles_normalised_prompt_embeddings():
    classifier = text_classifier(_BagOfLetters(), _LetterTokenizer(), ["a", "bb"], ["{}", "{} c"])
    prompt = F.normalize(torch.tensor([[1.0, 0, 0], [1, 0, 1], [0, 2, 0], [0, 2, 1]]), dim=-1)
    expected = F.normalize(torch.stack([prompt[:2].mean(0), prompt[2:].mean(0)]), dim=-1)
    torch.testing.assert_close(classifier, expected)


def test_class_names_and_templates(tmp_path):
    assert load_classnames("fashion-mnist")[7] == "sneaker"
    imagenet = load_classnames("imagenet")
    assert len(imagenet) == 1000 and imagenet[0] == "tench"
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    assert load_classnames(str(tmp_path / "names.txt")) == ["cat", "dog"]
    assert load_templates(None, "fashion-mnist")[0] == "a photo of a {}."
    assert "{}" in load_templates(None, "imagenet")[0]
    (tmp_path / "bad.txt").write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match="exactly one"):
        load_templates(str(tmp_path / "bad.txt"), "imagenet")
    with pytest.raises(FileNotFoundError, match="class names file not found"):
        load_classnames(str(tmp_path / "missing.txt"))


def test_easy_vqa_class_names_follow_the_exported_folders_label_order(tmp_path):
    """``--classnames easy-vqa`` must name label i of the export's classes/ folder (sorted folder
    names, as the image-folder reader numbers them) for every i."""
    from PIL import Image

    from defocus_vlm.data.classification import open_source
    from defocus_vlm.data.easy_vqa import class_folder
    from defocus_vlm.data.pairs import EASY_VQA_TEMPLATES

    names = load_classnames("easy-vqa")
    assert len(set(names)) == 24 and "blue circle" in names
    for name in names:
        (tmp_path / "val" / class_folder(name)).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "val" / class_folder(name) / "0.png")
    assert open_source("imagefolder", tmp_path, "val").classes == [class_folder(n) for n in names]
    assert load_templates(None, "easy_vqa") == EASY_VQA_TEMPLATES


def test_cli_reports_bad_models_in_one_line(tmp_path, capsys):
    from conftest import tiny_config

    from defocus_vlm import DefocusVisionModel
    from defocus_vlm.cli import main

    DefocusVisionModel(tiny_config("defocus_vit_small")).save_pretrained(tmp_path / "vision")
    args = ["--data", "/usr/share/datasets/fashion-mnist", "--classnames", "fashion-mnist"]
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "vision"), *args]) == 2
    assert "expected a CLIP model (model_type 'defocus_clip')" in capsys.readouterr().err
    assert main(["eval", "retrieval", "--model", str(tmp_path / "missing"), "--data", "easy-vqa"]) == 2
    assert "config.json missing" in capsys.readouterr().err
