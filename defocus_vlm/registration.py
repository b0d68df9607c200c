"""Register the package's classes with transformers' Auto* factories and timm."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_defocus import DefocusVisionConfig
from .configuration_vlm import DefocusVLMConfig
from .image_processing_defocus import DefocusImageProcessor
from .modeling_defocus import DefocusVisionForImageClassification, DefocusVisionModel
from .modeling_vlm import DefocusVLMForConditionalGeneration
from .processing_vlm import DefocusVLMProcessor

_done = False


def _register_vlm() -> None:
    import transformers

    AutoConfig.register(DefocusVLMConfig.model_type, DefocusVLMConfig, exist_ok=True)
    transformers.AutoModelForImageTextToText.register(DefocusVLMConfig, DefocusVLMForConditionalGeneration,
                                                      exist_ok=True)
    if hasattr(transformers, "AutoModelForVision2Seq"):  # the older name, removed in transformers 5
        transformers.AutoModelForVision2Seq.register(DefocusVLMConfig, DefocusVLMForConditionalGeneration,
                                                     exist_ok=True)
    transformers.AutoProcessor.register(DefocusVLMConfig, DefocusVLMProcessor, exist_ok=True)


def _register_clip() -> None:
    from transformers import AutoProcessor

    from .configuration_clip import DefocusCLIPConfig
    from .modeling_clip import DefocusCLIPModel
    from .processing_clip import DefocusCLIPProcessor

    AutoConfig.register(DefocusCLIPConfig.model_type, DefocusCLIPConfig, exist_ok=True)
    AutoModel.register(DefocusCLIPConfig, DefocusCLIPModel, exist_ok=True)
    AutoProcessor.register(DefocusCLIPConfig, DefocusCLIPProcessor, exist_ok=True)


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
    _register_vlm()
    _register_clip()
    from defocus_vlm.encoders.timm_models import register_timm_models

    register_timm_models()
    _done = True
