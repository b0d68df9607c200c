"""A new vision-language model from a vision encoder and a causal language model.

:func:`build_vlm` gives the model and its processor at once. It is two steps, which training takes apart because it
encodes its data with the processor before it builds the model: :func:`vlm_config` (the config, with the image
token added to the tokenizer; the processor is built from it) and :func:`assemble_vlm` (the model of that config,
with the parts' weights)."""

from __future__ import annotations

import copy
import os

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .configuration_defocus import DefocusVisionConfig
from .configuration_vlm import DefocusVLMConfig
from .image_processing_defocus import DefocusImageProcessor
from .modeling_defocus import DefocusVisionModel
from .modeling_vlm import DefocusVLMForConditionalGeneration
from .processing_vlm import DefocusVLMProcessor, add_image_token


def load_vision(
    vision: str | os.PathLike | DefocusVisionConfig | DefocusVisionModel,
) -> tuple[DefocusVisionConfig, DefocusVisionModel | None]:
    """(config, model) of a preset name (``"defocus_mamba_small"``: no weights, model None), an encoder directory
    (its pretrained weights), a config (model None) or a model."""
    if isinstance(vision, DefocusVisionModel):
        return vision.config, vision
    if isinstance(vision, DefocusVisionConfig):
        return vision, None
    if os.path.isdir(vision):
        model = DefocusVisionModel.from_pretrained(vision)
        return model.config, model
    return DefocusVisionConfig.from_preset(str(vision)), None


def vlm_config(vision_config: DefocusVisionConfig, text_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
               **config_kwargs) -> DefocusVLMConfig:
    """The config of a VLM on these parts. The image token is added to ``tokenizer`` (which then pads on the left,
    as decoder-only generation needs) and the language model's vocabulary grows to the tokenizer's when that made it
    larger (:func:`assemble_vlm` resizes the embeddings to match). ``config_kwargs``: other
    :class:`DefocusVLMConfig` fields (projector_type, vision_feature_select, ...)."""
    image_token_id = add_image_token(tokenizer)
    tokenizer.padding_side = "left"
    text_config = copy.deepcopy(text_config)
    text_config.vocab_size = max(text_config.vocab_size, len(tokenizer))
    return DefocusVLMConfig(vision_config=copy.deepcopy(vision_config), text_config=text_config,
                            image_token_id=image_token_id, **config_kwargs)


def assemble_vlm(config: DefocusVLMConfig, tokenizer: PreTrainedTokenizerBase, language_model: PreTrainedModel,
                 vision_model: DefocusVisionModel | None = None) -> DefocusVLMForConditionalGeneration:
    """The model of ``config`` (from :func:`vlm_config`) holding ``language_model``'s weights (its embeddings resized
    to the config's vocabulary first) and ``vision_model``'s when given (else a freshly initialised encoder); the
    projector is new. Generation stops and pads with the tokenizer's special tokens."""
    vocab = config.text_config.vocab_size
    if language_model.get_input_embeddings().num_embeddings < vocab:
        language_model.resize_token_embeddings(vocab)
    model = DefocusVLMForConditionalGeneration(config)
    model.language_model.load_state_dict(language_model.state_dict())
    if vision_model is not None:
        model.vision_tower.load_state_dict(vision_model.state_dict())
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model


def build_vlm(
    vision: str | os.PathLike | DefocusVisionConfig | DefocusVisionModel,
    language_model: str | os.PathLike | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_processor: DefocusImageProcessor | None = None,
    **config_kwargs,
) -> tuple[DefocusVLMForConditionalGeneration, DefocusVLMProcessor]:
    """A new VLM and its processor from an encoder and a causal LM.

    vision: a preset name (``"defocus_mamba_small"``), an encoder directory, a config or a model
        (pretrained weights are kept). language_model: a name/path for :func:`defocus_vlm.llm.load_llm`
        (``"smollm2-135m-instruct"`` works offline; its tokenizer is loaded too) or a model (then give
        ``tokenizer``). The image token is added to the tokenizer (embeddings resized if it grew).
    config_kwargs: other :class:`DefocusVLMConfig` fields (projector_type, vision_feature_select, ...).
    Returns ``(model, processor)``; the processor reads the image-token layout from ``model.config``.
    """
    from .llm import load_llm, load_tokenizer

    vision_config, vision_model = load_vision(vision)
    if not isinstance(language_model, PreTrainedModel):
        tokenizer = tokenizer or load_tokenizer(language_model)
        language_model = load_llm(language_model, dtype=torch.float32)
    if tokenizer is None:
        raise ValueError("a language model given as a model needs its tokenizer: build_vlm(..., tokenizer=...)")
    config = vlm_config(vision_config, language_model.config, tokenizer, **config_kwargs)
    model = assemble_vlm(config, tokenizer, language_model, vision_model)
    return model, DefocusVLMProcessor.from_config(model.config, tokenizer, image_processor)
