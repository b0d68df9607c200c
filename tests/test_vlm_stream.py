"""Streaming image prefill equals the one-shot forward: logits within fp32 tolerance and identical
greedy tokens, for a KV-cache LLM (tiny Llama) and a recurrent one (transformers' Mamba); plus the
Mamba cache pitfall it works around, the prefill order, batches, errors and the benchmark."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from transformers import DynamicCache, MambaForCausalLM
from vlm_helpers import tiny_vlm

from defocus_vlm.bench.stream import run_stream_benchmark
from defocus_vlm.cli import main as cli_main
from defocus_vlm.compat import CACHE_NAME, cache_argument, cache_of
from defocus_vlm.llm import tiny_mamba_config

torch.set_num_threads(1)

VARIED = {"initializer_range": 0.3}  # tiny random LMs at std 0.02 repeat one token; this makes greedy outputs vary
# Same computation in a different order: logits of magnitude ~10 agree to ~1e-5 relative in fp32.
FP32 = dict(atol=1e-4, rtol=1e-4)
PROMPT = "look:<image>what is it?"  # 5 text tokens, 17 image tokens, 12 text tokens


def image(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=["llama", "mamba"])
def vlm(request):
    torch.manual_seed(0)
    model, processor = tiny_vlm(request.param, text_overrides=VARIED)
    return model.eval(), processor


def inputs_for(processor, texts, images):
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def greedy(model, inputs, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_streamed_prefill_equals_one_shot(vlm, chunk_size):
    model, processor = vlm
    inputs = inputs_for(processor, [PROMPT], [image(0)])
    with torch.no_grad():
        one_shot = model(**inputs).logits
        streamed = model(**inputs, image_chunk_size=chunk_size).logits
    torch.testing.assert_close(streamed, one_shot, **FP32)
    tokens = greedy(model, inputs)
    assert greedy(model, inputs, image_chunk_size=chunk_size) == tokens
    assert len(set(tokens[0])) > 1


def test_text_before_the_image_is_prefilled_first_and_chunks_follow_in_order(vlm):
    model, processor = vlm
    inputs = inputs_for(processor, [PROMPT], [image(1)])
    positions = []
    with torch.no_grad():
        out = model.prefill_image_stream(inputs["input_ids"], inputs["pixel_values"], 4, logits_to_keep=1,
                                         chunk_callback=positions.append)
        last = model(**inputs).logits[:, -1:]
    # 5 prefix tokens, then image chunks of 4 tokens (17 = 4 * 4 + 1); the suffix comes after the last one.
    assert positions == [9, 13, 17, 21, 22]
    assert out.logits.shape == (1, 1, model.config.text_config.vocab_size)
    torch.testing.assert_close(out.logits, last, **FP32)


@pytest.mark.parametrize("select, layer", [("patches", -1), ("cls", -1), ("all", -2)])
def test_streaming_follows_the_token_selection_and_feature_layer(select, layer):
    torch.manual_seed(0)
    model, processor = tiny_vlm("llama", vision_feature_select=select, vision_feature_layer=layer)
    model.eval()
    inputs = inputs_for(processor, [PROMPT], [image(2)])
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == {"patches": 16, "cls": 1, "all": 17}[select]
    with torch.no_grad():
        chunks = list(model.stream_image_features(inputs["pixel_values"], 3))
        torch.testing.assert_close(torch.cat(chunks, 1), model.get_image_features(inputs["pixel_values"]).pooler_output,
                                   **FP32)
        torch.testing.assert_close(model(**inputs, image_chunk_size=3).logits, model(**inputs).logits,
                                   **FP32)


def test_several_images_and_left_padded_batches_stream_like_one_shot(vlm):
    model, processor = vlm
    # Same text after each image, so the left-padded placeholders line up across the batch.
    texts = ["a long question <image> and <image> ok?", "short <image> and <image> ok?"]
    inputs = inputs_for(processor, texts, [image(3), image(4), image(5), image(6)])
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        one_shot = model(**inputs, position_ids=positions).logits
        streamed = model(**inputs, position_ids=positions, image_chunk_size=6).logits
    real = mask.bool()
    torch.testing.assert_close(streamed[real], one_shot[real], **FP32)
    assert greedy(model, inputs, image_chunk_size=6) == greedy(model, inputs)


def test_a_second_turn_streams_into_the_cache_of_the_first(vlm):
    model, processor = vlm
    first = inputs_for(processor, ["one<image>ok"], [image(8)])
    second = inputs_for(processor, ["two<image>?"], [image(9)])
    both = torch.cat([first["input_ids"], second["input_ids"]], 1)
    with torch.no_grad():
        reference = model(input_ids=both, pixel_values=torch.cat([first["pixel_values"], second["pixel_values"]]))
        cache = cache_of(model(**first, use_cache=True))
        out = model.prefill_image_stream(second["input_ids"], second["pixel_values"], 5, cache=cache,
                                         attention_mask=torch.ones_like(both))
    torch.testing.assert_close(out.logits, reference.logits[:, first["input_ids"].shape[1]:], **FP32)


def test_the_cache_keeps_its_pre_5_24_name_as_an_alias(vlm):
    """transformers 5.24 calls the cache ``cache``; ``past_key_values`` (its earlier name) is still accepted."""
    model, processor = vlm
    first = inputs_for(processor, ["one<image>ok"], [image(8)])
    follow = processor.tokenizer(["go"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    mask = torch.ones(1, first["input_ids"].shape[1] + follow.shape[1], dtype=torch.long)
    with torch.no_grad():
        out = model(**first, use_cache=True)
        assert cache_of(out) is not None and out[CACHE_NAME] is cache_of(out)
        by_new = model(input_ids=follow, attention_mask=mask, cache=copy.deepcopy(cache_of(out))).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            by_old = model(input_ids=follow, attention_mask=mask, past_key_values=copy.deepcopy(cache_of(out))).logits
        # deprecated where renamed (5.24), as in transformers' own models; the only name before
        assert any("`past_key_values` is deprecated" in str(w.message) for w in caught) == (CACHE_NAME == "cache")
        torch.testing.assert_close(by_new, by_old, rtol=0, atol=0)
        with pytest.raises(ValueError, match="not both"):
            model(input_ids=follow, cache=cache_of(out), past_key_values=cache_of(out))


def test_transformers_mamba_cannot_continue_a_cache_with_several_tokens():
    """Why Mamba-family LLMs are pre-filled one token at a time after the first piece: in the installed
    transformers, a multi-token forward on a non-empty cache restarts the selective scan from zero.
    If this test starts failing, transformers fixed it and the stepwise path could go."""
    torch.manual_seed(0)
    lm = MambaForCausalLM(tiny_mamba_config(**VARIED)).eval()
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        reference = lm(ids).logits[:, -1]

        def continued(step: int) -> torch.Tensor:
            cache = DynamicCache(config=lm.config)
            lm(ids[:, :6], **{cache_argument(lm.forward): cache}, use_cache=True)
            for start in range(6, 12, step):
                logits = lm(ids[:, start:start + step], **{cache_argument(lm.forward): cache}, use_cache=True).logits
            return logits[:, -1]

        assert not torch.allclose(continued(6), reference, atol=1e-3)  # one 6-token continuation: wrong
        torch.testing.assert_close(continued(1), reference, **FP32)  # token by token: exact


def test_streaming_a_mamba_llm_in_multi_token_chunks_would_be_wrong():
    torch.manual_seed(0)
    model, processor = tiny_vlm("mamba", text_overrides=VARIED)
    model.eval()
    inputs = inputs_for(processor, [PROMPT], [image(7)])
    with torch.no_grad():
        one_shot = model(**inputs).logits
        assert model._stepwise_continuation
        torch.testing.assert_close(model(**inputs, image_chunk_size=8).logits, one_shot, **FP32)
        model._stepwise_continuation = False  # what a naive chunked prefill does
        naive = model(**inputs, image_chunk_size=8).logits
    assert (naive[0, 5:] - one_shot[0, 5:]).abs().max() > 1e-2


def test_streaming_refuses_what_it_cannot_do():
    torch.manual_seed(0)
    model, processor = tiny_vlm("llama")
    inputs = inputs_for(processor, ["ab<image>c", "b<image>cd"], [image(0), image(1)])  # placeholders misaligned
    with pytest.raises(ValueError, match="same positions in every sample"):
        model(**inputs, image_chunk_size=4)
    single = inputs_for(processor, ["ab<image>c"], [image(0)])
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        model(**single, image_chunk_size=0)
    with pytest.raises(ValueError, match="for inference"):
        model(**single, image_chunk_size=4, labels=single["input_ids"])
    vit, vit_processor = tiny_vlm("llama", vision_preset="vit_tiny")  # the non-causal baseline
    with pytest.raises(ValueError, match="needs a causal encoder"):
        vit(**inputs_for(vit_processor, ["ab<image>c"], [image(0)]), image_chunk_size=4)


def test_stream_benchmark_reports_both_paths(capsys):
    result = run_stream_benchmark(lengths=[16, 64], chunk_size=8, vision_preset="defocus_mamba_tiny",
                                  vision_depth=1, patch_size=4, repeats=1)
    assert [row["patches"] for row in result["rows"]] == [16, 64]
    for row in result["rows"]:
        assert row["image_tokens"] == row["patches"] + 1 and row["prompt_tokens"] == row["image_tokens"] + 32
        assert row["same_first_token"] and row["max_abs_logit_diff"] < 1e-4
        assert row["oneshot_ttft_ms"] > 0 and row["stream_ttft_ms"] > 0
    assert cli_main(["bench", "stream", "--lengths", "1000"]) == 2
    assert "perfect squares" in capsys.readouterr().err
    assert json.dumps(result)
