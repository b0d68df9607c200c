"""The clip stage end to end on a DeepSpeed engine (CPU, gloo): export and reload, evaluation CLIs
reproducing the training numbers, gradient accumulation that keeps every negative (GradCache),
exact resume, SigLIP with a locked tower, config errors.

The shared run (module fixture) accumulates 2 micro batches per step with drop path and EMA on."""

from __future__ import annotations

import json

import pytest
import torch
from defocus_vlm.training.config import ConfigError, load_config
from safetensors.torch import load_file

torch.set_num_threads(1)
FASHION = "/usr/share/datasets/fashion-mnist"
BASE = ["train.progress=false", "train.tensorboard=false", "data.verify=4"]


def tiny(out, *extra):
    return load_config("tiny_cpu", [*BASE, f"train.output_dir={out}", *extra], stage="clip")


FULL = ["train.micro_batch_size=16", "train.ema_decay=0.5", "train.drop_path_max=0.1", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from defocus_vlm.training.clip import run

    out = tmp_path_factory.mktemp("clip_full")
    return out, run(tiny(out, *FULL))


def test_run_exports_a_clip_model_and_its_image_tower(full_run):
    from transformers import AutoModel, AutoProcessor

    from defocus_vlm import DefocusCLIPModel, DefocusVisionModel

    out, summary = full_run
    assert summary["steps"] == 8 and all(torch.isfinite(torch.tensor(summary["losses"])))
    for name in ("metrics.json", "losses.json", "checkpoints/latest", "model/model.safetensors",
                 "model/tokenizer.json", "model/raw/model.safetensors", "model/image_tower/model.safetensors"):
        assert (out / name).exists(), name
    assert type(AutoModel.from_pretrained(out / "model")) is DefocusCLIPModel
    assert AutoProcessor.from_pretrained(out / "model").tokenizer.model_max_length == 48
    tower = AutoModel.from_pretrained(out / "model" / "image_tower")
    assert type(tower) is DefocusVisionModel and tower.config.in_chans == 1


def test_eval_clis_reproduce_the_training_numbers(full_run, capsys):
    from defocus_vlm.cli import main

    out, summary = full_run
    for name, model_dir in (("ema", out / "model"), ("raw", out / "model" / "raw")):
        assert main(["eval", "zeroshot", "--model", str(model_dir), "--data", FASHION, "--classnames", "fashion-mnist",
                     "--limit", "64", "--batch-size", "20"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert {k: result[k] for k in ("samples", "top1", "top5")} == summary["val"][name]


def test_resume_with_accumulation_reproduces_the_run(full_run, tmp_path):
    from defocus_vlm.training.clip import run

    _, full = full_run
    first = run(tiny(tmp_path, *FULL, "train.stop_after=3"))
    assert first.get("interrupted") and len(first["losses"]) == 3
    rest = run(tiny(tmp_path, *FULL), resume=True)
    assert rest["losses"] == full["losses"] and rest["val"] == full["val"]


def test_accumulation_keeps_all_in_batch_negatives(tmp_path):
    """4 micro batches of 8 = one batch of 32: same losses and same weights (fp32 round-off aside)."""
    from defocus_vlm.training.clip import run

    common = ["train.max_steps=3", "train.epochs=1", "data.limit_val=16"]
    whole = run(tiny(tmp_path / "whole", *common))
    cached = run(tiny(tmp_path / "cached", *common, "train.micro_batch_size=8"))
    assert cached["losses"] == pytest.approx(whole["losses"], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cached" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_siglip_with_a_locked_text_tower_scored_by_retrieval(tmp_path):
    """easy-VQA pairs (RGB): validation is retrieval, and the retrieval CLI reproduces it."""
    from defocus_vlm.eval.retrieval import run_retrieval_eval
    from defocus_vlm.training.clip import build_clip_model, build_tokenizer, run

    from defocus_vlm.cli import main

    cfg = tiny(tmp_path, "model.loss=siglip", "model.text.freeze=true", "train.max_steps=2", "train.epochs=1",
               "data.source=easy_vqa", "data.path=easy_vqa", "data.val_split=test", "data.in_chans=3",
               "data.limit_train=64", "data.limit_val=24")
    summary = run(cfg)
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    val = summary["val"]["raw"]
    assert val["images"] == 24 and 0 <= val["t2i_r1"] <= val["t2i_r5"] <= 100
    assert {k: v for k, v in run_retrieval_eval(tmp_path / "model", "easy_vqa", limit=24).items() if k in val} == val
    assert main(["eval", "retrieval", "--model", str(tmp_path / "model"), "--data", "easy-vqa", "--limit", "4"]) == 0
    torch.manual_seed(cfg.train.seed)  # the run's initial weights
    initial = build_clip_model(cfg, build_tokenizer(cfg.model.text)).state_dict()
    trained = load_file(tmp_path / "model" / "model.safetensors")
    assert "logit_bias" in trained and not torch.equal(trained["logit_bias"], initial["logit_bias"])
    for key in (k for k in trained if k.startswith("text_model.")):
        assert torch.equal(trained[key], initial[key]), key
    assert not torch.equal(trained["text_projection.weight"], initial["text_projection.weight"])


def test_config_errors_and_print_config(capsys):
    from defocus_vlm.cli import main

    with pytest.raises(ConfigError, match="exactly one of model.text.pretrained"):
        tiny("/tmp/x", "model.text.pretrained=some/model")
    with pytest.raises(ConfigError, match="nothing but the projections"):
        tiny("/tmp/x", "model.text.freeze=true", "model.vision.freeze=true")
    with pytest.raises(ConfigError, match="did you mean"):
        tiny("/tmp/x", "model.los=siglip")
    assert main(["train", "clip", "--config", "tiny_cpu", "model.loss=siglip", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["loss"] == "siglip"
