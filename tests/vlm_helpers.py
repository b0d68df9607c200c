"""A tiny random vision-language model and its processor, for the tests that need one."""

from __future__ import annotations

from conftest import tiny_config
from transformers import AutoModelForCausalLM

from defocus_vlm import build_vlm
from defocus_vlm.llm import build_char_tokenizer, tiny_llama_config, tiny_mamba_config

TEXT_CONFIGS = {"llama": tiny_llama_config, "mamba": tiny_mamba_config}


def tiny_vlm(text_model: str = "llama", vision_preset: str = "defocus_mamba_small",
             vision_overrides: dict | None = None, text_overrides: dict | None = None, **config_kwargs):
    """A tiny random VLM (16 px images in 4 px patches, width-32 encoder of 2 blocks; a 2-layer language model) and
    its processor (character tokenizer).

    text_model: "llama" (attention, KV cache) or "mamba" (transformers' MambaForCausalLM: recurrent).
    vision_overrides / text_overrides: fields of the tiny encoder / language model configs.
    Returns ``(model, processor)`` like :func:`defocus_vlm.build_vlm`.
    """
    if text_model not in TEXT_CONFIGS:
        raise ValueError(f"text_model must be one of {sorted(TEXT_CONFIGS)}, got {text_model!r}")
    vision = tiny_config(vision_preset, **(vision_overrides or {}))
    language_model = AutoModelForCausalLM.from_config(TEXT_CONFIGS[text_model](**(text_overrides or {})))
    return build_vlm(vision, language_model, tokenizer=build_char_tokenizer(), **config_kwargs)
