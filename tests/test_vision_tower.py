"""``model.vision`` (one VisionTowerConfig for every stage): a preset, or the encoder of an export
directory (classifier, CLIP model, VLM), with overrides and freezing; its errors name the key."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from defocus_vlm.training.config import ConfigError, load_config
from vlm_helpers import tiny_vlm

from defocus_vlm import DefocusCLIPConfig, DefocusCLIPModel

torch.set_num_threads(1)
LLAMA = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
CLASSES = [str(i) for i in range(10)]


def classifier(*overrides: str) -> torch.nn.Module:
    """The stage-1 model of tiny_cpu (Fashion-MNIST: 28 px, grey, 10 classes) with ``overrides``."""
    from defocus_vlm.training.classification import ClassificationTask

    task = ClassificationTask(load_config("tiny_cpu", list(overrides)))
    task.classes = CLASSES  # what build_data reads from the data
    return task.build_model()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    vision = tiny_config("defocus_mamba_small", in_chans=1, num_labels=0)
    clip = DefocusCLIPModel(DefocusCLIPConfig(vision_config=vision, text_config=LLAMA, projection_dim=8))
    clip.save_pretrained(root / "clip")
    vlm, processor = tiny_vlm("llama", "defocus_mamba_small")
    vlm.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    trained = classifier()
    trained.save_pretrained(root / "classifier")
    return root, clip, vlm, trained


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_classification_starts_from_a_clip_image_tower_under_a_new_head(exports):
    root, clip, _, _ = exports
    model = classifier(f"model.vision.source={root / 'clip'}", "model.vision.overrides={}")
    assert _same(model.defocus, clip.vision_model)
    assert model.config.num_labels == 10 and model.config.img_size == 28 and model.config.aux_loss == "pooled"


def test_classification_keeps_a_classifiers_head_when_the_classes_fit(exports):
    root, _, _, trained = exports
    assert _same(classifier(f"model.vision.source={root / 'classifier'}", "model.vision.overrides={}"), trained)


def test_a_vlm_tower_must_fit_the_data_and_overrides_must_keep_the_shapes(exports):
    root, _, vlm, _ = exports
    unfit = r"model.vision: the weights saved in .*vlm do not fit the configured tower \(encoder.patch_embed"
    with pytest.raises(ConfigError, match=unfit + r".proj.weight is \[32, 3, 4, 4\] there, \[32, 1, 4, 4\] here\)"):
        classifier(f"model.vision.source={root / 'vlm'}", "model.vision.overrides={}")  # RGB encoder, grey data
    model = classifier(f"model.vision.source={root / 'vlm'}", "model.vision.overrides={}", "data.in_chans=3")
    assert _same(model.defocus, vlm.vision_tower)
    with pytest.raises(ConfigError, match="do not fit"):  # tiny_cpu's own overrides (patch 7, ...)
        classifier(f"model.vision.source={root / 'clip'}")
    with pytest.raises(ConfigError, match=r"classifier do not fit .*\(\+\d+ more\)"):  # not silently re-initialised
        classifier(f"model.vision.source={root / 'classifier'}", "model.vision.overrides={embed_dim: 48}")


def test_freeze_trains_only_the_head():
    model = classifier("model.vision.freeze=true")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("head.", "aux_head.")) for n in trained)
    assert all(p.requires_grad for p in classifier().parameters())


def test_overrides_on_an_export_rebuild_it_with_the_same_weights(exports):
    from defocus_vlm.training.config import VisionTowerConfig
    from defocus_vlm.training.towers import load_encoder

    root, clip, _, _ = exports
    encoder = load_encoder(VisionTowerConfig(source=str(root / "clip"), overrides={"drop_path_rate": 0.2}))
    assert encoder.config.drop_path_rate == 0.2 and _same(encoder, clip.vision_model)


def test_clip_and_instruct_take_the_encoder_of_any_export(exports):
    from defocus_vlm.training.clip import _vision_tower
    from defocus_vlm.training.instruct import vision_tower

    root, clip, vlm, _ = exports
    keep = "model.vision.overrides={}"
    config, model = _vision_tower(load_config("tiny_cpu", [f"model.vision.source={root / 'classifier'}", keep],
                                              stage="clip"))
    assert model is not None and config.num_labels == 10  # the stage-1 export's encoder
    with pytest.raises(ConfigError, match="reads 3-channel images but data.in_chans is 1"):
        _vision_tower(load_config("tiny_cpu", [f"model.vision.source={root / 'vlm'}", keep], stage="clip"))
    instruct = load_config("tiny_cpu", [f"model.vision.source={root / 'clip'}", keep], stage="instruct")
    assert _same(vision_tower(instruct.model.vision), clip.vision_model)


def test_source_errors_name_the_key(tmp_path):
    from defocus_vlm.training.clip import _vision_tower

    with pytest.raises(ConfigError, match="model.vision.overrides.img_size is set by the stage"):
        classifier("model.vision.overrides.img_size=32")
    with pytest.raises(ConfigError, match="model.vision: unknown preset 'defocus_mamba_tiiny'"):
        classifier("model.vision.source=defocus_mamba_tiiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.vision.source: no model at .*empty"):
        classifier(f"model.vision.source={tmp_path / 'empty'}")
    from transformers import AutoConfig

    AutoConfig.for_model("llama", **{k: v for k, v in LLAMA.items() if k != "model_type"}).save_pretrained(
        tmp_path / "llama")
    with pytest.raises(ConfigError, match="holds a llama model"):
        _vision_tower(load_config("tiny_cpu", [f"model.vision.source={tmp_path / 'llama'}"], stage="clip"))
