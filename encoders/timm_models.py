"""timm registration: ``timm.create_model("defocus_mamba_small", num_classes=10)`` after
``import defocus_vlm``. The model is the encoder plus a linear head on the class token, with
timm's ``forward_features`` / ``forward_head`` / ``reset_classifier`` conventions."""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .config import EncoderConfig
from .layers import init_linear
from .model import DefocusEncoder
from .presets import PRESETS

_ENCODER_FIELDS = EncoderConfig.field_names()


class DefocusTimmModel(nn.Module):
    def __init__(self, num_classes: int = 1000, **kwargs):
        super().__init__()
        kwargs = {k: v for k, v in kwargs.items() if k in _ENCODER_FIELDS}
        self.encoder = DefocusEncoder(EncoderConfig(**kwargs))
        self.num_features = self.embed_dim = self.encoder.cfg.embed_dim
        self.reset_classifier(num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        init_linear(self.head)  # as the Hugging Face classifier's head: same init whichever door built the model

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.encoder.pooled(x)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _factory(preset: str):
    def create(pretrained: bool = False, **kwargs) -> DefocusTimmModel:
        if pretrained:
            raise ValueError(f"{preset}: no pretrained weights are bundled; load an HF directory with "
                             "DefocusVisionForImageClassification.from_pretrained instead")
        values = {k: v for k, v in PRESETS[preset].items() if k in _ENCODER_FIELDS}
        for src, dst in (("img_size", "img_size"), ("in_chans", "in_chans"), ("drop_path_rate", "drop_path_rate")):
            if src in kwargs:
                values[dst] = kwargs.pop(src)
        values.update({k: kwargs.pop(k) for k in list(kwargs) if k in _ENCODER_FIELDS})
        return DefocusTimmModel(num_classes=kwargs.pop("num_classes", 1000), **values)

    create.__name__ = create.__qualname__ = preset
    create.__module__ = __name__
    return create


def register_timm_models() -> list[str]:
    """Register every preset that timm does not already name; returns the registered names."""
    import timm.models
    from timm.models import register_model

    done = []
    module = sys.modules[__name__]
    for preset in PRESETS:
        if timm.models.is_model(preset) and not hasattr(module, preset):
            continue
        if not hasattr(module, preset):
            fn = _factory(preset)
            setattr(module, preset, fn)
            register_model(fn)
        done.append(preset)
    return done
