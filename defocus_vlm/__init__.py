"""defocus-vlm: 1D causal vision encoders (De-focus ViT / RetNet / Mamba) for multimodal LLMs.

Importing the package registers its configs and models with the transformers Auto* classes
and its presets with timm. Heavy optional packages (deepspeed, datasets, mamba-ssm, ...) are
imported only by the code paths that need them.
"""

from __future__ import annotations

from defocus_vlm.encoders.presets import list_presets

from .build import build_vlm
from .configuration_clip import DefocusCLIPConfig
from .configuration_defocus import DefocusVisionConfig
from .configuration_vlm import DefocusVLMConfig
from .image_processing_defocus import DefocusImageProcessor
from .modeling_clip import DefocusCLIPModel, DefocusCLIPOutput
from .modeling_defocus import (
    DefocusImageClassifierOutput,
    DefocusVisionForImageClassification,
    DefocusVisionModel,
)
from .modeling_vlm import DefocusVLMForConditionalGeneration, DefocusVLMOutput
from .processing_clip import DefocusCLIPProcessor
from .processing_vlm import DefocusVLMProcessor
from .registration import register_all

__version__ = "0.1.0"

register_all()

__all__ = [
    "DefocusCLIPConfig",
    "DefocusCLIPModel",
    "DefocusCLIPOutput",
    "DefocusCLIPProcessor",
    "DefocusImageClassifierOutput",
    "DefocusImageProcessor",
    "DefocusVisionConfig",
    "DefocusVisionForImageClassification",
    "DefocusVisionModel",
    "DefocusVLMConfig",
    "DefocusVLMForConditionalGeneration",
    "DefocusVLMOutput",
    "DefocusVLMProcessor",
    "build_vlm",
    "list_presets",
]
