"""The vision-language model: config checks, splicing several images per sample, the count-mismatch
error, the loss, generation (cache on/off, left-padded batches) and save/load (Auto class and
trust_remote_code in a fresh process). Tiny random models: 16 px images -> 17 image tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForImageTextToText, AutoProcessor
from vlm_helpers import tiny_vlm

from defocus_vlm import DefocusVisionConfig, DefocusVLMConfig
from defocus_vlm.compat import disable_activation_checkpointing, enable_activation_checkpointing
from defocus_vlm.llm import tiny_llama_config

torch.set_num_threads(1)


def image(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (16, 16, 3), dtype=np.uint8)


# Random tiny LMs at the usual init (std 0.02) repeat one token; larger weights make greedy outputs vary,
# so that equal generations mean something.
VARIED = {"initializer_range": 0.3}
FP32 = dict(atol=1e-4, rtol=1e-4)  # batched vs single: logits of magnitude ~10 agree to ~1e-5 relative


@pytest.fixture(scope="module", params=["llama", "mamba"])
def vlm(request):
    torch.manual_seed(0)
    model, processor = tiny_vlm(request.param, text_overrides=VARIED)
    return model.eval(), processor


@pytest.fixture(scope="module")
def llama_vlm():
    torch.manual_seed(0)
    model, processor = tiny_vlm("llama", text_overrides=VARIED)
    return model.eval(), processor


def batch(processor, texts, images, **kwargs):
    return processor(text=texts, images=images, padding=True, return_tensors="pt", **kwargs)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as generate makes them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, message", [
    (dict(projector_type="mlp3x"), "projector_type must be one of"),
    (dict(vision_feature_select="pooled"), "vision_feature_select must be one of"),
    (dict(vision_feature_layer=3), r"vision_feature_layer must be in \[-3, 2\]"),
    (dict(image_token_id=128), "outside the language model's vocabulary"),
    (dict(vision_feature_select="cls", vision_config=tiny_config(cls_position="none")), "needs an encoder with"),
])
def test_config_refuses_bad_values(kwargs, message):
    kwargs.setdefault("vision_config", tiny_config())
    with pytest.raises(ValueError, match=message):
        DefocusVLMConfig(text_config=tiny_llama_config(), **kwargs)


def test_image_token_count_follows_size_patch_and_selection():
    vision = DefocusVisionConfig.from_preset("defocus_vit_tiny", img_size=224, patch_size=16)
    counts = {select: DefocusVLMConfig(vision_config=vision, vision_feature_select=select).num_image_tokens()
              for select in ("all", "patches", "cls")}
    assert counts == {"all": 197, "patches": 196, "cls": 1}
    assert DefocusVLMConfig(vision_config=vision).num_image_tokens(64, 128) == 4 * 8 + 1


# ---------------------------------------------------------------------------- forward
def test_several_images_per_sample_and_different_counts_across_the_batch(vlm):
    model, processor = vlm
    texts, images = ["a<image>b<image>cd", "xy<image>z"], [image(0), image(1), image(2)]
    inputs = batch(processor, texts, images)
    assert inputs["pixel_values"].shape == (3, 3, 16, 16)
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [34, 17]
    with torch.no_grad():
        batched = model(**inputs, position_ids=positions(inputs["attention_mask"])).logits
        for row, (text, own_images) in enumerate([(texts[0], images[:2]), (texts[1], images[2:])]):
            single = model(**batch(processor, [text], own_images)).logits[0]
            real = inputs["attention_mask"][row].bool()
            torch.testing.assert_close(batched[row, real], single, **FP32)
        swapped = model(**batch(processor, [texts[0]], images[1::-1])).logits[0]
    # The two images of sample 0 land on their own placeholders: swapping them changes the output.
    assert not torch.allclose(swapped, model(**batch(processor, [texts[0]], images[:2])).logits[0], atol=1e-3)


def test_image_positions_only_change_what_follows_them(llama_vlm):
    model, processor = llama_vlm
    with torch.no_grad():
        first = model(**batch(processor, ["abc<image>de"], [image(0)])).logits[0]
        second = model(**batch(processor, ["abc<image>de"], [image(1)])).logits[0]
    torch.testing.assert_close(first[:3], second[:3])  # the text before the image cannot see it
    assert (first[3:] - second[3:]).abs().max() > 1e-3


def test_placeholder_and_image_count_mismatch_is_one_clear_error(llama_vlm):
    model, processor = llama_vlm
    inputs = batch(processor, ["a<image>b"], [image(0)])
    two_images = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match=r"input_ids hold 17 image tokens \(\[17\] per sample\), but the 2 images "
                                         r"give 34 \(17 per image\)"):
        model(input_ids=inputs["input_ids"], pixel_values=two_images)
    cut = inputs["input_ids"][:, :-3]  # 15 of the 17 placeholders left
    with pytest.raises(ValueError, match="hold 15 image tokens"):
        model(input_ids=cut, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(input_ids=inputs["input_ids"])


def test_loss_is_shifted_next_token_cross_entropy_over_text(llama_vlm):
    model, processor = llama_vlm
    inputs = batch(processor, ["ab<image>cdef"], [image(0)])
    labels = inputs["input_ids"].clone()
    labels[0, :2] = -100
    out = model(**inputs, labels=labels)
    with torch.no_grad():
        logits = model(**inputs).logits
    targets = labels[0, 1:].masked_fill(inputs["input_ids"][0, 1:] == model.config.image_token_id, -100)
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for part in (model.vision_tower, model.multi_modal_projector, model.language_model):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    model.zero_grad()


@pytest.mark.parametrize("text_model", ["llama", "mamba"])
def test_loss_from_the_kept_positions_equals_the_full_logits_loss_in_float64(text_model):
    """With labels the head runs only where some sample trains its next token; the loss (mean, and summed with
    num_items_in_batch) equals the cross-entropy of the full logits, and the logits are those positions' rows."""
    torch.manual_seed(0)
    model, processor = tiny_vlm(text_model, text_overrides=VARIED)
    model = model.double().eval()
    inputs = batch(processor, ["ab<image>cdefgh", "x<image>yz"], [image(0), image(1)])
    inputs["pixel_values"] = inputs["pixel_values"].double()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[0, :-4], labels[1, :-2] = -100, -100  # answers: the last tokens of each sample
    with torch.no_grad():
        full = model(**inputs).logits
        kept = model(**inputs, labels=labels)
        summed = model(**inputs, labels=labels, num_items_in_batch=1).loss
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    trained = (targets != -100).any(0).nonzero().squeeze(1)
    assert 0 < len(trained) < labels.shape[1] - 17  # far fewer rows than positions
    # transformers' Mamba head returns float32 logits whatever the weights' dtype; Llama's stay float64
    assert full.dtype == (torch.float32 if text_model == "mamba" else torch.float64)
    tolerance = dict(rtol=1e-12, atol=1e-12) if full.dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kept.logits, full[:, trained], **tolerance)
    reference = torch.nn.functional.cross_entropy(full.double().flatten(0, 1), targets.flatten(), reduction="none")
    torch.testing.assert_close(kept.loss.double(), reference.sum() / (targets != -100).sum(), **tolerance)
    torch.testing.assert_close(summed.double(), reference.sum(), **tolerance)
    with pytest.raises(ValueError, match="logits_to_keep is chosen from the labels"):
        model(**inputs, labels=labels, logits_to_keep=1)


def test_gradient_checkpointing_reaches_encoder_and_language_model(llama_vlm):
    model, processor = llama_vlm
    inputs = batch(processor, ["ab<image>cd"], [image(0)])
    reference = model(**inputs, labels=inputs["input_ids"]).loss
    model.train()
    try:
        enable_activation_checkpointing(model, {"use_reentrant": False})
        assert all(block.gradient_checkpointing for block in model.vision_tower.encoder.blocks)
        assert all(layer.gradient_checkpointing for layer in model.language_model.model.layers)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
    finally:
        disable_activation_checkpointing(model)
        model.zero_grad()
        model.eval()
    assert not any(block.gradient_checkpointing for block in model.vision_tower.encoder.blocks)
    torch.testing.assert_close(loss, reference)


# ---------------------------------------------------------------------------- generation
def generated(model, inputs, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def test_generation_with_and_without_cache_is_identical(vlm):
    model, processor = vlm
    inputs = batch(processor, ["hi<image>what?"], [image(3)])
    with_cache = generated(model, inputs)
    assert with_cache == generated(model, inputs, use_cache=False)
    assert len(set(with_cache[0])) > 1  # not a degenerate repetition


def test_left_padded_batch_generation_equals_per_sample(vlm):
    model, processor = vlm
    texts, images = ["a long prompt<image>?", "b<image>x<image>?"], [image(4), image(5), image(6)]
    assert processor.tokenizer.padding_side == "left"
    batched = generated(model, batch(processor, texts, images))
    single = [generated(model, batch(processor, [texts[0]], images[:1]))[0],
              generated(model, batch(processor, [texts[1]], images[1:]))[0]]
    assert batched == single


# ---------------------------------------------------------------------------- save / load
def test_save_load_through_auto_classes(llama_vlm, tmp_path):
    model, processor = llama_vlm
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "defocus_remote.DefocusVLMForConditionalGeneration"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    inputs = batch(loaded_processor, ["ab<image>c"], [image(7)])
    torch.testing.assert_close(inputs["input_ids"], batch(processor, ["ab<image>c"], [image(7)])["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)

    # A fresh process that never imported defocus_vlm: trust_remote_code finds the classes via the shim.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "assert 'defocus_vlm' not in sys.modules\n"
        f"model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()\n"
        f"processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "import numpy as np\n"
        "img = np.random.RandomState(7).randint(0, 256, (16, 16, 3), dtype=np.uint8)\n"
        "inputs = processor(text=['ab<image>c'], images=[img], return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    print(type(model).__name__, model(**inputs).logits.sum().item())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                            env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    name, total = result.stdout.split()[-2:]
    assert name == "DefocusVLMForConditionalGeneration"
    with torch.no_grad():
        assert float(total) == pytest.approx(model(**inputs).logits.sum().item(), rel=1e-5, abs=1e-3)
