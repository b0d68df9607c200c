"""Hugging Face configuration for the De-focus vision encoders."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from numbers import Integral, Real

from transformers import PretrainedConfig

from defocus_vlm.encoders.config import EncoderConfig
from defocus_vlm.encoders.presets import get_preset, list_presets

HEAD_TYPES = ("linear", "mlp")
AUX_LOSSES = ("pooled", "token", "none")
# annotation of an EncoderConfig field -> (accepted types, the type named in the message). A config.json
# edited by hand ("embed_dim": "32") must fail here, not as an odd TypeError deep in validation.
_FIELD_TYPES = {
    "int": ((Integral,), "an integer"),
    "float": ((Real,), "a number"),
    "float | None": ((Real, type(None)), "a number or null"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def check_field_types(values: Mapping) -> None:
    """Raise one ValueError naming the first encoder field whose value has the wrong JSON type."""
    for field in fields(EncoderConfig):
        annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        if field.name not in values or annotation not in _FIELD_TYPES:
            continue
        value = values[field.name]
        types, words = _FIELD_TYPES[annotation]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # bool is an int
            raise ValueError(f"{field.name} must be {words}, got {value!r} ({type(value).__name__})")


def check_label_maps(values: Mapping) -> None:
    """id2label / label2id must be JSON objects; a list would fail inside transformers with an AttributeError."""
    for key, example in (("id2label", '{"0": "cat"}'), ("label2id", '{"cat": 0}')):
        value = values.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a mapping like {example}, got a {type(value).__name__}: {value!r:.80}")


class DefocusVisionConfig(PretrainedConfig):
    """Every :class:`~defocus_vlm.encoders.EncoderConfig` field, plus the classification heads.

    head_type: "linear", or "mlp" (Linear(D, head_hidden_mult*D), Tanh, Linear: the official
        IN-22k heads of De-focus Mamba-L).
    aux_loss: "pooled" (the paper: CE of an auxiliary head on the mean of the patch tokens),
        "token" (the official code: the auxiliary head on every patch token, CE averaged) or
        "none". The training loss is (CE(class token) + aux) / 2.
    preset: name of the preset this config was built from (informative).
    """

    model_type = "defocus_vision"
    # transformers' standard names for what the encoder calls embed_dim, num_heads, depth, img_size, in_chans
    attribute_map = {"hidden_size": "embed_dim", "num_attention_heads": "num_heads", "num_hidden_layers": "depth",
                     "image_size": "img_size", "num_channels": "in_chans"}
    # the key under which a composite config (CLIP, VLM) holds this one: DefocusVisionConfig.from_pretrained(vlm_dir)
    base_config_key = "vision_config"

    def __init__(
        self,
        preset: str | None = None,
        head_type: str | None = None,
        head_hidden_mult: int = 3,
        aux_loss: str = "pooled",
        initializer_range: float = 0.02,
        **kwargs,
    ):
        values = get_preset(preset) if preset is not None else {}
        for alias, name in self.attribute_map.items():  # standard names become encoder fields (and are validated)
            if alias in kwargs:
                if name in kwargs and kwargs[name] != kwargs[alias]:
                    raise ValueError(f"{alias}={kwargs[alias]!r} and {name}={kwargs[name]!r} name the same setting")
                kwargs[name] = kwargs.pop(alias)
        if head_type is None:
            head_type = values.pop("head_type", "linear")
        values.pop("head_type", None)
        names = EncoderConfig.field_names()
        values.update({k: kwargs.pop(k) for k in list(kwargs) if k in names})
        check_field_types(values)
        check_label_maps(kwargs)
        if not isinstance(head_hidden_mult, Integral) or isinstance(head_hidden_mult, bool):
            raise ValueError(f"head_hidden_mult must be an integer, got {head_hidden_mult!r}")
        encoder = EncoderConfig.from_dict(values)  # validates; raises one clear error
        for key, value in encoder.to_dict().items():
            setattr(self, key, value)
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        if aux_loss not in AUX_LOSSES:
            raise ValueError(f"aux_loss must be one of {AUX_LOSSES}, got {aux_loss!r}")
        self.preset = preset
        self.head_type = head_type
        self.head_hidden_mult = head_hidden_mult
        self.aux_loss = aux_loss
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DefocusVisionConfig:
        """``DefocusVisionConfig.from_preset("defocus_mamba_small", num_labels=10, img_size=28)``."""
        return cls(preset=name, **overrides)

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig.from_dict({k: getattr(self, k) for k in EncoderConfig.field_names()})

    @staticmethod
    def list_presets() -> list[str]:
        return list_presets()
