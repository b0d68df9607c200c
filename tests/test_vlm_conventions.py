"""The VLM behaves as transformers' LLaVA under transformers' standard entry points: assisted decoding,
inputs_embeds with pixel_values, shift_labels, get_image_features' 5.x output type and the image outputs in the
forward output, static-cache / compiled generation, and torch.export of the forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CompileConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vlm_helpers import tiny_vlm

from defocus_vlm.compat import CACHE_NAME

torch.set_num_threads(1)
VARIED = {"initializer_range": 0.3}  # random tiny LMs at std 0.02 repeat one token; these vary


def image(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (16, 16, 3), dtype=np.uint8)


def make(text_model: str = "llama", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model, processor = tiny_vlm(text_model, text_overrides=VARIED, **kwargs)
    return model.eval(), processor


@pytest.fixture(scope="module")
def llama_vlm():
    return make()


def prompt(processor, text: str = "hi<image>what?", seed: int = 3):
    return processor(text=[text], images=[image(seed)], return_tensors="pt")


def new_tokens(model, inputs, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)
    return out[0, -8:].tolist()


# ---------------------------------------------------------------------------- generation
def test_assisted_generation_equals_greedy(llama_vlm):
    model, processor = llama_vlm
    inputs = prompt(processor)
    greedy = new_tokens(model, inputs)
    assert len(set(greedy)) > 1
    assert new_tokens(model, inputs, assistant_model=model) == greedy  # drafts all accepted
    other, _ = make(seed=1)  # a different assistant: drafts rejected and re-drafted
    assert new_tokens(model, inputs, assistant_model=other) == greedy


def test_image_tokens_without_pixel_values(llama_vlm):
    model, processor = llama_vlm
    inputs = prompt(processor)
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):  # a new sequence needs its images
        model(input_ids=inputs["input_ids"])
    with torch.no_grad():
        cache = getattr(model(**inputs, use_cache=True), CACHE_NAME)
        # once the cache holds the prompt, placeholder ids that come later are plain tokens (drafted / generated)
        later = torch.full((1, 3), model.config.image_token_id)
        out = model(input_ids=later, attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 3, dtype=torch.long),
                    cache=cache)
    assert out.logits.shape[1] == 3


def test_inputs_embeds_with_pixel_values_equal_input_ids(llama_vlm):
    model, processor = llama_vlm
    inputs = processor(text=["a<image>b<image>cd", "xy<image>z"], images=[image(0), image(1), image(2)],
                       padding=True, return_tensors="pt")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        by_ids = model(**inputs, labels=labels)
        by_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"],
                          attention_mask=inputs["attention_mask"], labels=labels)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits)
    torch.testing.assert_close(by_embeds.loss, by_ids.loss)
    single = prompt(processor)
    with torch.no_grad():
        generated = model.generate(inputs_embeds=model.get_input_embeddings()(single["input_ids"]),
                                   attention_mask=single["attention_mask"], pixel_values=single["pixel_values"],
                                   max_new_tokens=8, do_sample=False)
    assert generated[0].tolist() == new_tokens(model, single)
    with pytest.raises(ValueError, match=r"inputs_embeds hold 51 image tokens \(\[34, 17\] per sample\)"):
        model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"][:2], attention_mask=inputs["attention_mask"])


def test_shift_labels_are_the_loss_targets(llama_vlm):
    model, processor = llama_vlm
    inputs = prompt(processor, "ab<image>cdef")
    ids = inputs["input_ids"]
    shifted = F.pad(ids[:, 1:], (0, 1), value=-100)  # what the trainer hands over under sequence parallelism
    with torch.no_grad():
        reference = model(**inputs, labels=ids).loss
        given = model(**inputs, shift_labels=shifted).loss
        ignored_labels = model(**inputs, labels=torch.zeros_like(ids), shift_labels=shifted).loss
        other_targets = model(**inputs, labels=ids, shift_labels=torch.zeros_like(shifted)).loss
    torch.testing.assert_close(given, reference)  # image targets ignored either way
    torch.testing.assert_close(ignored_labels, reference)  # shift_labels win over labels
    assert not torch.allclose(other_targets, reference)


# ---------------------------------------------------------------------------- image features
def test_get_image_features_returns_the_5x_output_type():
    model, processor = make(vision_preset="defocus_vit_small")
    pixels = prompt(processor)["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixels)
        full = model.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
        as_tuple = model.get_image_features(pixels, return_dict=False)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.last_hidden_state.shape == (1, 17, 32)  # the image tower's tokens
    assert out.pooler_output.shape == (1, 17, model.config.text_config.hidden_size)  # projected, one row per image
    assert out.hidden_states is None and out.attentions is None
    assert len(full.hidden_states) == 3 and len(full.attentions) == 2 and full.attentions[0].shape == (1, 2, 17, 17)
    torch.testing.assert_close(full.pooler_output, out.pooler_output)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.pooler_output)


def test_forward_output_carries_the_image_outputs(llama_vlm):
    model, processor = llama_vlm
    inputs = prompt(processor)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        features = model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
    assert isinstance(out.image_outputs, BaseModelOutputWithPooling)
    torch.testing.assert_close(out.image_outputs.pooler_output, features.pooler_output)
    assert torch.equal(out.image_hidden_states, out.image_outputs.pooler_output)
    assert len(out.image_outputs.hidden_states) == 3  # the mamba tower: hidden states, no attention probabilities
    assert out.image_outputs.attentions is None and len(out.hidden_states) == 3  # the language model's too


# ---------------------------------------------------------------------------- compile / static cache / export
def test_can_compile_fullgraph_is_set_by_the_language_model():
    llama, _ = make()
    mamba, _ = make("mamba")
    assert llama._can_compile_fullgraph is True  # LlamaForCausalLM's, and the VLM adds no graph break
    assert mamba._can_compile_fullgraph is False


def test_training_forward_compiles_whole_and_gives_the_eager_loss(llama_vlm):
    """With labels, eager calls keep only the trained positions' logits (a data-dependent shape); traced code keeps
    them all, so the forward with labels still compiles without a graph break, to the same loss."""
    model, processor = llama_vlm
    inputs = prompt(processor, "ab<image>cdef")
    labels = inputs["input_ids"].clone()
    labels[0, :-3] = -100
    with torch.no_grad():
        eager = model(**inputs, labels=labels)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(**inputs, labels=labels)
    assert eager.logits.shape[1] == 3 and compiled.logits.shape[1] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(compiled.loss, eager.loss)


def test_static_cache_and_compiled_generation_equal_eager(llama_vlm):
    model, processor = llama_vlm
    inputs = prompt(processor)
    eager = new_tokens(model, inputs)
    assert new_tokens(model, inputs, cache_implementation="static") == eager
    compile_config = CompileConfig(fullgraph=True, backend="eager")  # dynamo traces the whole step, no graph break
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    compiled = []
    original = model.get_compiled_call
    model.get_compiled_call = lambda config: compiled.append(config) or original(config)
    try:
        assert new_tokens(model, inputs, cache_implementation="static", compile_config=compile_config) == eager
    finally:
        del model.get_compiled_call
    assert compiled == [compile_config]


@pytest.mark.parametrize("preset", ["defocus_vit_small", "defocus_mamba_small"])
def test_torch_export_of_the_forward_equals_eager(preset):
    model, processor = make(vision_preset=preset)
    inputs = processor(text=["hi<image>what?", "a<image>b"], images=[image(0), image(1)], padding=True,
                       return_tensors="pt")

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vlm = model

        def forward(self, input_ids, pixel_values, attention_mask):
            return self.vlm(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            use_cache=False).logits

    wrapped = Logits()
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    with torch.no_grad():
        expected = wrapped(*args)
        for pixels in (torch.cat([args[1]] * 2), args[1][:1]):  # the checks stay, in eager calls
            with pytest.raises(ValueError, match="image tokens and images do not match"):
                wrapped(args[0], pixels, args[2])
    exported = torch.export.export(wrapped, args)
    # eager inference folds De-focus ViT's decay into SDPA's causal fast path (one extra q.k dimension), the
    # exported graph keeps the decay bias: the same function, rounded differently in float32
    torch.testing.assert_close(exported.module()(*args), expected, rtol=1e-4, atol=5e-5)
