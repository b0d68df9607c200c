"""Hugging Face configuration of the LLaVA-style vision-language model on a De-focus encoder."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_defocus import DefocusVisionConfig

PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
FEATURE_SELECTS = ("all", "patches", "cls")


def _text_config(value: PretrainedConfig | dict | None) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        return CONFIG_MAPPING["llama"]()
    if not isinstance(value, dict) or "model_type" not in value:
        raise ValueError(f"text_config must be a transformers config or a dict with a 'model_type', got {value!r:.200}")
    return AutoConfig.for_model(**value)


class DefocusVLMConfig(PretrainedConfig):
    """A De-focus vision encoder, a projector and any Hugging Face causal language model.

    vision_config: a :class:`DefocusVisionConfig` (or its dict); the encoder must be causal to stream.
    text_config: the config (or dict with ``model_type``) of any causal LM: Llama, SmolLM2, Mamba, ...
    projector_type: "mlp2x_gelu" (Linear, GELU, Linear: LLaVA-1.5) or "linear".
    image_token_id: the placeholder token id in ``input_ids``; each image's projected tokens replace
        a run of these.
    vision_feature_select: which encoder tokens reach the LLM: "all" (patches and the class token,
        in the encoder's order), "patches" or "cls" (the class token only).
    vision_feature_layer: -1 takes the encoder output (``last_hidden_state``, after its final norm);
        any other value indexes ``hidden_states`` (0 = patch embeddings, k = output of block k, before
        the final norm; negative values count from the end, -2 being the penultimate block).
    """

    model_type = "defocus_vlm"
    sub_configs = {"vision_config": DefocusVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: DefocusVisionConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        projector_type: str = "mlp2x_gelu",
        image_token_id: int | None = None,
        vision_feature_select: str = "all",
        vision_feature_layer: int = -1,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = DefocusVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        self.vision_config = vision_config if vision_config is not None else DefocusVisionConfig()
        self.text_config = _text_config(text_config)
        self.projector_type = projector_type
        self.image_token_id = image_token_id
        self.vision_feature_select = vision_feature_select
        self.vision_feature_layer = vision_feature_layer
        self.initializer_range = initializer_range
        self._validate()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.vision_feature_select not in FEATURE_SELECTS:
            raise ValueError(f"vision_feature_select must be one of {FEATURE_SELECTS}, "
                             f"got {self.vision_feature_select!r}")
        if self.vision_feature_select == "cls" and self.vision_config.cls_position == "none":
            raise ValueError("vision_feature_select='cls' needs an encoder with a class token, "
                             "but vision_config.cls_position is 'none'")
        depth = self.vision_config.depth
        if not -(depth + 1) <= self.vision_feature_layer <= depth:
            raise ValueError(f"vision_feature_layer must be in [{-(depth + 1)}, {depth}] for an encoder of depth "
                             f"{depth}, got {self.vision_feature_layer}")
        vocab = getattr(self.text_config, "vocab_size", None)
        if self.image_token_id is not None and vocab is not None and not 0 <= self.image_token_id < vocab:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the language model's vocabulary "
                             f"(vocab_size {vocab}); add the image token to the tokenizer and resize the embeddings")

    @property
    def has_class_token(self) -> bool:
        return self.vision_config.cls_position != "none"

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """LLM tokens per image of ``height x width`` pixels (default: the encoder's ``img_size``): the one place the
        image-token layout is computed; the processor expands each placeholder to this many tokens and the model
        checks its inputs against it."""
        if self.vision_feature_select == "cls":
            return 1
        tokens = self.vision_config.encoder_config().num_tokens(height, width)
        return tokens - int(self.has_class_token) if self.vision_feature_select == "patches" else tokens
