"""Processor of the vision-language model: DefocusImageProcessor + a tokenizer + a chat template.

Each image placeholder in the text becomes as many image tokens as the model's config gives for that image
(:meth:`DefocusVLMConfig.num_image_tokens`, the one owner of the image-token layout): the processor holds that
config; it never keeps copies of patch size or token selection."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.tokenization_utils_base import AddedToken

from .configuration_defocus import DefocusVisionConfig
from .configuration_vlm import DefocusVLMConfig
from .constants import IMAGE_TOKEN
from .image_io import load_image
from .image_processing_defocus import DefocusImageProcessor

# What processors saved before they read the model's config kept in processor_config.json.
LEGACY_LAYOUT_KEYS = ("patch_size", "vision_feature_select", "has_class_token")
# from_pretrained keywords that say where config.json is found (the hub, its cache, a revision).
_HUB_KEYWORDS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def chatml_template(image_token: str = IMAGE_TOKEN) -> str:
    """ChatML (SmolLM2's format) for messages whose content is a string or a list of typed parts
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}``; an image part becomes ``image_token``."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{- '{image_token}' -}}}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> int:
    """Make ``image_token`` one special token of ``tokenizer`` (added if missing); returns its id.
    Resize the language model's embeddings to ``len(tokenizer)`` afterwards if it grew."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(image_token)


def legacy_layout_config(saved: dict) -> DefocusVLMConfig:
    """A config that gives the image-token layout an old ``processor_config.json`` recorded (patch size, token
    selection, class token): for a processor directory saved on its own, without its model's config.json."""
    patch = int(saved["patch_size"])
    size = saved.get("image_processor", {}).get("size")
    img_size = size if isinstance(size, int) and size > 0 and size % patch == 0 else patch
    vision = DefocusVisionConfig(patch_size=patch, img_size=img_size,
                                 cls_position="end" if saved["has_class_token"] else "none")
    return DefocusVLMConfig(vision_config=vision, vision_feature_select=saved["vision_feature_select"])


def saved_config(path: str | os.PathLike, saved: dict, **hub_kwargs) -> DefocusVLMConfig:
    """The VLM config a saved processor expands placeholders with: its model's ``config.json`` beside it, else (an
    old processor saved alone) the layout its ``processor_config.json`` recorded."""
    from transformers.utils import cached_file

    # Asked for by name: from_pretrained of a directory without config.json gives a default config, not an error.
    if cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs) is not None:
        return DefocusVLMConfig.from_pretrained(path, **hub_kwargs)
    if all(key in saved for key in LEGACY_LAYOUT_KEYS):
        return legacy_layout_config(saved)
    raise FileNotFoundError(f"{Path(path) / 'config.json'} not found: a DefocusVLMProcessor reads the image-token "
                            "layout from its model's config; save the processor together with the model "
                            "(model.save_pretrained(dir)), or build it with DefocusVLMProcessor.from_config")


def _flat_images(images) -> list:
    """One flat list of images from a single image, a batch tensor/array or (nested) lists;
    local paths are read here so a missing file is one clear error."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flat_images(item)]
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike)) and not str(images).startswith(("http://", "https://")):
        return [load_image(images)]
    return [images]


class DefocusVLMProcessor(ProcessorMixin):
    """``processor(images=..., text=...)`` gives ``input_ids``, ``attention_mask`` and ``pixel_values``
    (all images of the batch in placeholder order); ``apply_chat_template`` accepts messages whose
    content lists ``{"type": "image", "image": ...}`` and ``{"type": "text", "text": ...}`` parts.

    config: the model's :class:`DefocusVLMConfig`; it decides how many tokens each placeholder becomes. Build the
    processor with :meth:`from_config`, or load it from a saved model directory (``from_pretrained`` reads the
    model's ``config.json``; directories written by earlier versions load too).
    """

    def __init__(
        self,
        image_processor: DefocusImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
        config: DefocusVLMConfig | None = None,
        **kwargs,
    ):
        if tokenizer is None or image_processor is None:
            raise ValueError("DefocusVLMProcessor needs both an image_processor and a tokenizer")
        if not isinstance(config, DefocusVLMConfig):
            raise ValueError("DefocusVLMProcessor needs the model's DefocusVLMConfig (it gives the image-token "
                             "layout): use DefocusVLMProcessor.from_config(config, tokenizer) or load a saved model "
                             f"directory, got config={type(config).__name__}")
        if image_token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {image_token!r} token; call "
                             "defocus_vlm.processing_vlm.add_image_token(tokenizer) first (and resize the "
                             "language model's embeddings)")
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if config.image_token_id is not None and self.image_token_id != config.image_token_id:
            raise ValueError(f"the tokenizer's {image_token!r} has id {self.image_token_id}, but the model config "
                             f"expects image_token_id {config.image_token_id}")
        # Not an __init__ argument's name, so save_pretrained never writes it: config.json is its one copy.
        self.vlm_config = config
        super().__init__(image_processor, tokenizer, chat_template=chat_template or chatml_template(image_token),
                         **kwargs)

    @classmethod
    def from_config(cls, config: DefocusVLMConfig, tokenizer: PreTrainedTokenizerBase,
                    image_processor: DefocusImageProcessor | None = None, **kwargs) -> DefocusVLMProcessor:
        """The processor of a model with ``config``; the default image processor gives the encoder's image size
        and channels."""
        vision = config.vision_config
        image_processor = image_processor or DefocusImageProcessor(size=vision.img_size, num_channels=vision.in_chans)
        return cls(image_processor, tokenizer, config=config, **kwargs)

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path: str | os.PathLike,
                           **kwargs: Any) -> tuple[dict, dict]:
        """transformers' reading of ``processor_config.json``, plus the model's config as ``config`` (the layout
        copies older versions saved there are dropped: the model's config.json is what the model runs with)."""
        processor_dict, rest = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        saved = dict(processor_dict)
        for key in LEGACY_LAYOUT_KEYS:
            processor_dict.pop(key, None)
        hub = {key: kwargs[key] for key in _HUB_KEYWORDS if kwargs.get(key) is not None}
        processor_dict["config"] = saved_config(pretrained_model_name_or_path, saved, **hub)
        return processor_dict, rest

    def __call__(self, images=None, text=None, **kwargs):
        # DefocusImageProcessor takes a flat list; chat templates give one list of images per conversation.
        images = _flat_images(images) if images is not None else None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            placeholders = sum(t.count(self.image_token) for t in texts if isinstance(t, str))
            if placeholders != len(images or []):
                raise ValueError(f"the text holds {placeholders} {self.image_token} placeholders but "
                                 f"{len(images or [])} images were given; they must match one to one")
        return super().__call__(images=images, text=text, **kwargs)

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Tokens of one image of ``height x width`` pixels (default: the image processor's output size), as the
        model's config gives them."""
        size = self.image_processor.size
        return self.vlm_config.num_image_tokens(height or size, width or size)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """transformers' hook: the text that replaces the ``image_idx``-th placeholder."""
        height, width = image_inputs["pixel_values"][image_idx].shape[-2:]
        return self.image_token * self.num_image_tokens(int(height), int(width))

    def expand_image_tokens(self, input_ids: Sequence[int], *aligned: Sequence[int],
                            image_size: tuple[int, int] | None = None) -> tuple[np.ndarray, ...]:
        """The placeholder expansion of ``__call__`` on token ids: each image token of ``input_ids`` repeated to the
        token count of an image of ``image_size`` (default: the image processor's output size), and every
        ``aligned`` sequence (labels, masks) repeated with it. Returns ``(input_ids, *aligned)`` as int64 arrays.
        (A placeholder is one special token, so expanding before or after tokenising gives the same ids.)"""
        ids = np.asarray(input_ids, np.int64)
        per_image = self.num_image_tokens(*(image_size or ()))
        repeats = np.where(ids == self.image_token_id, per_image, 1)
        return tuple(np.repeat(np.asarray(values, np.int64), repeats) for values in (ids, *aligned))
