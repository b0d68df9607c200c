"""Hugging Face configuration of the CLIP-style dual encoder (stage 2): a De-focus image tower and
any Hugging Face text model."""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig

from .configuration_defocus import DefocusVisionConfig

TEXT_POOLINGS = ("auto", "last", "mean", "first")
LOSS_TYPES = ("clip", "siglip")
# the SigLIP paper's initial temperature and bias; CLIP's temperature is 1 / 0.07
_INIT_SCALE = {"clip": math.log(1 / 0.07), "siglip": math.log(10.0)}
_INIT_BIAS = {"clip": None, "siglip": -10.0}


def is_causal_text_config(config: PretrainedConfig) -> bool:
    """Decoders (Llama/SmolLM2, GPT-2, ...) read left to right; encoders with a masked-LM head
    (BERT, MiniLM, RoBERTa, ...) are bidirectional unless configured as decoders."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return bool(getattr(config, "is_decoder", False)) or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _text_config(value) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        values = dict(value)
        model_type = values.pop("model_type", None)
        if not model_type:
            raise ValueError(f"text_config needs a model_type (e.g. 'llama' or 'bert'), got keys {sorted(value)}")
        return AutoConfig.for_model(model_type, **values)
    raise ValueError(f"text_config must be a dict or a PretrainedConfig, got {type(value).__name__}")


class DefocusCLIPConfig(PretrainedConfig):
    """A :class:`DefocusVisionConfig` image tower (pooled at the class token) and any text model
    config (``text_config``: a config object, or a dict with ``model_type``), both linearly projected
    to ``projection_dim``.

    text_pooling: "last" (the last non-pad token: causal LMs such as SmolLM2), "mean" (masked mean:
        bidirectional encoders such as MiniLM), "first" (the [CLS] token) or "auto" (last for
        causal text models, mean otherwise; resolved when the config is built).
    loss_type: "clip" (InfoNCE) or "siglip" (pairwise sigmoid with a learnable bias); it chooses the
        initial ``logit_scale`` (log of 1/0.07, or log 10) and ``logit_bias`` (none, or -10) unless
        those are given. ``logit_bias_init_value`` None means no bias parameter (clip).
    logit_scale_max: the exponentiated scale is clamped to this (open_clip uses 100).
    """

    model_type = "defocus_clip"
    # So that transformers reaches both towers: attn_implementation (from_pretrained, set_attn_implementation),
    # dtype, and the composite save / load of each sub-config.
    sub_configs = {"vision_config": DefocusVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: DefocusVisionConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        projection_dim: int = 512,
        text_pooling: str = "auto",
        loss_type: str = "clip",
        logit_scale_init_value: float | None = None,
        logit_bias_init_value: float | None = None,
        logit_scale_max: float = 100.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = DefocusVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        self.vision_config = vision_config if vision_config is not None else DefocusVisionConfig()
        # default text tower: a small causal transformer sized for the built-in byte-level tokenizer
        self.text_config = _text_config(text_config if text_config is not None else {
            "model_type": "llama", "vocab_size": 260, "hidden_size": 256, "intermediate_size": 1024,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 128, "tie_word_embeddings": False})
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}, got {text_pooling!r}")
        if int(projection_dim) <= 0:
            raise ValueError(f"projection_dim must be positive, got {projection_dim}")
        if text_pooling == "auto":
            text_pooling = "last" if is_causal_text_config(self.text_config) else "mean"
        self.projection_dim = int(projection_dim)
        self.text_pooling = text_pooling
        self.loss_type = loss_type
        self.logit_scale_init_value = (
            float(logit_scale_init_value) if logit_scale_init_value is not None else _INIT_SCALE[loss_type]
        )
        if logit_bias_init_value is None:
            logit_bias_init_value = _INIT_BIAS[loss_type]
        self.logit_bias_init_value = float(logit_bias_init_value) if logit_bias_init_value is not None else None
        self.logit_scale_max = float(logit_scale_max)
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def text_hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def vision_hidden_size(self) -> int:
        return int(self.vision_config.embed_dim)
