"""Processor of the vision-language model: DefocusImageProcessor + a tokenizer + a chat template.

Each image placeholder in the text becomes as many image tokens as the encoder gives for that
image (patches, class token, or both: see ``DefocusVLMConfig.vision_feature_select``)."""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.tokenization_utils_base import AddedToken

from .configuration_vlm import DefocusVLMConfig, num_image_tokens
from .constants import IMAGE_TOKEN
from .image_io import load_image
from .image_processing_defocus import DefocusImageProcessor

DEFAULT_IMAGE_TOKEN = IMAGE_TOKEN


def chatml_template(image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
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


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = DEFAULT_IMAGE_TOKEN) -> int:
    """Make ``image_token`` one special token of ``tokenizer`` (added if missing); returns its id.
    Resize the language model's embeddings to ``len(tokenizer)`` afterwards if it grew."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(image_token)


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

    patch_size / vision_feature_select / has_class_token must match the model (use :meth:`from_config`).
    """

    def __init__(
        self,
        image_processor: DefocusImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        patch_size: int = 16,
        vision_feature_select: str = "all",
        has_class_token: bool = True,
        **kwargs,
    ):
        if tokenizer is None or image_processor is None:
            raise ValueError("DefocusVLMProcessor needs both an image_processor and a tokenizer")
        if image_token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {image_token!r} token; call "
                             "defocus_vlm.processing_vlm.add_image_token(tokenizer) first (and resize the "
                             "language model's embeddings)")
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.patch_size = patch_size
        self.vision_feature_select = vision_feature_select
        self.has_class_token = has_class_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template or chatml_template(image_token),
                         **kwargs)

    @classmethod
    def from_config(cls, config: DefocusVLMConfig, tokenizer: PreTrainedTokenizerBase,
                    image_processor: DefocusImageProcessor | None = None, **kwargs) -> DefocusVLMProcessor:
        """A processor that matches ``config`` (its image size, patch size, token selection and image token)."""
        vision = config.vision_config
        image_processor = image_processor or DefocusImageProcessor(size=vision.img_size, num_channels=vision.in_chans)
        processor = cls(image_processor, tokenizer, patch_size=vision.patch_size,
                        vision_feature_select=config.vision_feature_select,
                        has_class_token=config.has_class_token, **kwargs)
        if config.image_token_id is not None and processor.image_token_id != config.image_token_id:
            raise ValueError(f"the tokenizer's {processor.image_token!r} has id {processor.image_token_id}, but the "
                             f"model config expects image_token_id {config.image_token_id}")
        return processor

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

    def num_image_tokens(self, height: int, width: int) -> int:
        return num_image_tokens(height, width, self.patch_size, self.vision_feature_select, self.has_class_token)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """transformers' hook: the text that replaces the ``image_idx``-th placeholder."""
        height, width = image_inputs["pixel_values"][image_idx].shape[-2:]
        return self.image_token * self.num_image_tokens(int(height), int(width))
