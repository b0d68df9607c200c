"""Top-k metrics against hand-worked cases; evaluation independent of batch size; EMA vs raw."""

from __future__ import annotations

import json

import pytest
import torch
from defocus_vlm.eval.classification import (
    evaluate,
    run_classification_eval,
    summarize,
    topk_accuracy,
    topk_correct,
)

torch.set_num_threads(1)


def test_topk_hand_worked():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.4],  # ranking 1, 2, 0
            [0.9, 0.05, 0.05],  # ranking 0, then tie 1/2 -> lower index first
            [0.2, 0.3, 0.5],
        ]
    )  # ranking 2, 1, 0
    targets = torch.tensor([2, 2, 2])
    assert topk_correct(logits, targets, (1, 2, 3)) == {1: 1, 2: 2, 3: 3}
    acc = topk_accuracy(logits, targets, (1, 2))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3)
    assert topk_correct(logits, targets, (5,)) == {5: 3}  # k capped at the class count
    assert summarize({1: 1, 5: 3}, 4) == {"samples": 4, "top1": 25.0, "top5": 75.0}
    with pytest.raises(ValueError, match="expected logits"):
        topk_correct(logits, targets[:2])


def _tiny_export(path, num_labels=10, ema=False):
    from defocus_vlm import DefocusImageProcessor, DefocusVisionConfig, DefocusVisionForImageClassification

    torch.manual_seed(0)
    cfg = DefocusVisionConfig.from_preset(
        "defocus_vit_tiny",
        num_labels=num_labels,
        img_size=28,
        patch_size=7,
        in_chans=1,
        embed_dim=16,
        depth=1,
        num_heads=2,
    )
    model = DefocusVisionForImageClassification(cfg)
    model.save_pretrained(path)
    DefocusImageProcessor(size=28, crop_pct=1.0, num_channels=1).save_pretrained(path)
    if ema:
        torch.manual_seed(1)
        other = DefocusVisionForImageClassification(cfg)
        other.save_pretrained(path / "raw")
        DefocusImageProcessor(size=28, crop_pct=1.0, num_channels=1).save_pretrained(path / "raw")
    return model


def test_eval_independent_of_batch_size(tmp_path):
    _tiny_export(tmp_path / "m")
    results = [
        run_classification_eval(
            tmp_path / "m", "/usr/share/datasets/fashion-mnist", batch_size=bs, limit=100
        )["model"]
        for bs in (1, 7, 100)
    ]
    assert results[0] == results[1] == results[2]
    assert results[0]["samples"] == 100


def test_evaluate_sums_counts_across_shards():
    model = torch.nn.Linear(4, 3)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):
            return type("O", (), {"logits": self.m(pixel_values)})()

    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    whole = evaluate(Wrap(), [(x, y)], ks=(1,))
    parts = [evaluate(Wrap(), [(x[i::3], y[i::3])], ks=(1,)) for i in range(3)]
    assert sum(round(p["top1"] * p["samples"] / 100) for p in parts) == round(whole["top1"] * 30 / 100)


def test_eval_cli_reports_ema_and_raw(tmp_path, capsys):
    from defocus_vlm.cli import main

    _tiny_export(tmp_path / "m", ema=True)
    rc = main(
        [
            "eval",
            "classification",
            "--model",
            str(tmp_path / "m"),
            "--data",
            "/usr/share/datasets/fashion-mnist",
            "--batch-size",
            "50",
            "--limit",
            "50",
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"ema", "raw"} and out["ema"]["samples"] == 50 and "top5" in out["raw"]
    assert json.loads((tmp_path / "r.json").read_text()) == out
    assert main(["eval", "classification", "--model", str(tmp_path / "none"), "--data", "/tmp"]) == 2
    assert "config.json missing" in capsys.readouterr().err
