"""Register the package's classes with transformers' Auto* factories and timm."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_defocus import DefocusVisionConfig
from .image_processing_defocus import DefocusImageProcessor
from .modeling_defocus import DefocusVisionForImageClassification, DefocusVisionModel

_done = False


def register_all() -> None:
    global _done
    if _done:
        return
    AutoConfig.register(DefocusVisionConfig.model_type, DefocusVisionConfig, exist_ok=True)
    AutoModel.register(DefocusVisionConfig, DefocusVisionModel, exist_ok=True)
    AutoModelForImageClassification.register(DefocusVisionConfig, DefocusVisionForImageClassification,
                                             exist_ok=True)
    backends = {"pil": DefocusImageProcessor, "torchvision": DefocusImageProcessor}
    AutoImageProcessor.register(DefocusVisionConfig, image_processor_classes=backends,
                                exist_ok=True)
    from defocus_vlm.encoders.timm_models import register_timm_models

    register_timm_models()
    _done = True
