"""DefocusCLIPModel: config defaults, text pooling, save/load through the Auto classes, the image
tower as a standalone DefocusVisionModel, stage-1 initialisation and tower locking."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from transformers import AutoModel, AutoProcessor

from defocus_vlm import (
    DefocusCLIPConfig,
    DefocusCLIPModel,
    DefocusCLIPProcessor,
    DefocusImageProcessor,
    DefocusVisionForImageClassification,
    DefocusVisionModel,
)
from defocus_vlm.contrastive import contrastive_loss
from defocus_vlm.modeling_clip import export_image_tower, load_clip, pool_text
from defocus_vlm.processing_clip import byte_level_tokenizer

torch.set_num_threads(1)
LLAMA = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
BERT = dict(model_type="bert", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=64)


def _clip(text=LLAMA, **kwargs) -> DefocusCLIPModel:
    vision = tiny_config("defocus_vit_small", in_chans=1, num_labels=0)
    return DefocusCLIPModel(DefocusCLIPConfig(vision_config=vision, text_config=dict(text), projection_dim=8,
                                              **kwargs)).eval()


def _processor() -> DefocusCLIPProcessor:
    return DefocusCLIPProcessor(DefocusImageProcessor(size=16, crop_pct=1.0, num_channels=1), byte_level_tokenizer(32))


def _batch(processor, texts=("a photo of a sneaker.", "a bag")):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16), dtype=np.uint8) for _ in texts]
    return processor(text=list(texts), images=images)


def test_config_defaults_follow_the_text_model_and_loss():
    assert _clip().config.text_pooling == "last"  # causal LM: the last non-pad token
    assert _clip(BERT).config.text_pooling == "mean"  # bidirectional encoder: masked mean
    clip, siglip = _clip().config, _clip(loss_type="siglip").config
    assert clip.logit_scale_init_value == pytest.approx(math.log(1 / 0.07)) and clip.logit_bias_init_value is None
    assert siglip.logit_scale_init_value == pytest.approx(math.log(10)) and siglip.logit_bias_init_value == -10
    with pytest.raises(ValueError, match="loss_type"):
        DefocusCLIPConfig(text_config=LLAMA, loss_type="triplet")
    with pytest.raises(ValueError, match="model_type"):
        DefocusCLIPConfig(text_config={"hidden_size": 8})
    with pytest.raises(ValueError, match="text_pooling"):
        DefocusCLIPConfig(text_config=LLAMA, text_pooling="max")


def test_pool_text_hand_worked():
    hidden = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1)  # token value = its index (+4 in row 2)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool_text(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool_text(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool_text(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]
    assert pool_text(hidden, right, "first").flatten().tolist() == [0.0, 4.0]
    with pytest.raises(ValueError, match="pooling"):
        pool_text(hidden, right, "max")


@pytest.mark.parametrize("text", [LLAMA, BERT], ids=["causal-last", "bidirectional-mean"])
def test_text_features_do_not_depend_on_padding(text):
    model, processor = _clip(text), _processor()
    alone = processor(text=["a bag"])
    padded = processor(text=["a bag", "a much longer caption than the first"])
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # really padded
    with torch.no_grad():
        one = model.get_text_features(**alone).pooler_output
        two = model.get_text_features(**padded).pooler_output
    torch.testing.assert_close(one[0], two[0], rtol=1e-5, atol=1e-6)


def test_forward_logits_and_loss():
    model, processor = _clip(loss_type="siglip"), _processor()
    with torch.no_grad():
        out = model(**_batch(processor), return_loss=True)
    cos = out.image_embeds @ out.text_embeds.T
    torch.testing.assert_close(out.logits_per_image, 10.0 * cos - 10.0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    expected = contrastive_loss("siglip", out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)
    torch.testing.assert_close(out.loss, expected)
    features = model.get_image_features(_batch(processor)["pixel_values"]).pooler_output
    assert features.shape == (2, 8)  # projected, not normalised (as transformers' CLIPModel)


def test_save_load_round_trip_through_auto_classes(tmp_path):
    model, processor = _clip(), _processor()
    with torch.no_grad():
        model.logit_scale.fill_(1.5)  # not the initial value: loading must not re-initialise it
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is DefocusCLIPModel and type(loaded_processor) is DefocusCLIPProcessor
    assert loaded.logit_scale.item() == pytest.approx(1.5)
    with torch.no_grad():
        a = model(**_batch(processor)).logits_per_image
        b = loaded(**_batch(loaded_processor)).logits_per_image
    torch.testing.assert_close(a, b)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "defocus_remote.DefocusCLIPModel"
    shim = (tmp_path / "defocus_remote.py").read_text()
    assert all(name in shim for name in ("DefocusCLIPConfig", "DefocusCLIPModel", "DefocusCLIPProcessor"))


def test_image_tower_exports_as_a_vision_model(tmp_path):
    model, processor = _clip(), _processor()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    export_image_tower(tmp_path / "clip", tmp_path / "tower")
    tower = AutoModel.from_pretrained(tmp_path / "tower").eval()
    assert type(tower) is DefocusVisionModel
    pixels = _batch(processor)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels).pooler_output, model.vision_model(pixels).pooler_output)
    assert (tmp_path / "tower" / "preprocessor_config.json").is_file()
    with pytest.raises(ValueError, match="expected a 'defocus_clip'"):
        load_clip(tmp_path / "tower")
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_clip(tmp_path / "nothing")


def test_stage1_classifier_weights_initialise_the_image_tower(tmp_path):
    classifier = DefocusVisionForImageClassification(tiny_config("defocus_vit_small", in_chans=1, num_labels=10))
    classifier.save_pretrained(tmp_path)
    tower = DefocusVisionModel.from_pretrained(tmp_path)  # the classifier's "defocus." prefix is dropped
    model = DefocusCLIPModel(DefocusCLIPConfig(vision_config=tower.config, text_config=LLAMA, projection_dim=8),
                             vision_model=tower)
    for name, value in classifier.defocus.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[name], value)


def test_pretrained_text_tower_and_its_tokenizer_are_loaded(tmp_path):
    """model.text.pretrained (as for MiniLM or SmolLM2): the saved weights and tokenizer are used as they are."""
    from defocus_vlm.training.clip import build_clip_model, build_tokenizer
    from defocus_vlm.training.config import load_config

    text = AutoModel.from_config(DefocusCLIPConfig(text_config=BERT).text_config)
    text.save_pretrained(tmp_path / "bert")
    byte_level_tokenizer(64).save_pretrained(tmp_path / "bert")
    cfg = load_config("tiny_cpu", [f"model.text.pretrained={tmp_path / 'bert'}", "model.text.config={}",
                                   "model.text.tokenizer=null", "model.text.freeze=true"], stage="clip")
    tokenizer = build_tokenizer(cfg.model.text)
    model = build_clip_model(cfg, tokenizer)
    assert model.config.text_pooling == "mean" and tokenizer.model_max_length == cfg.model.text.max_length
    for name, value in text.state_dict().items():
        torch.testing.assert_close(model.text_model.state_dict()[name], value)
    assert not any(p.requires_grad for p in model.text_model.parameters())


def test_locked_tower_gets_no_gradient_and_stays_in_eval_mode():
    model, processor = _clip(), _processor()
    model.lock_image_tower()
    model.train()
    assert not model.vision_model.training and model.text_model.training
    model(**_batch(processor), return_loss=True).loss.backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert model.visual_projection.weight.grad is not None and model.logit_scale.grad is not None
    assert any(p.grad is not None for p in model.text_model.parameters())


def test_processor_validates_input():
    processor = _processor()
    with pytest.raises(ValueError, match="give text, images or both"):
        processor()
    with pytest.raises(ValueError, match="strings"):
        processor(text=[1, 2])
    tok = processor.tokenizer
    ids = tok("hé")["input_ids"]
    assert ids[-1] == tok.eos_token_id and len(ids) == 4  # 3 UTF-8 bytes + eos
    assert tok.decode(ids, skip_special_tokens=True) == "hé"
