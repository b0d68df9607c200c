"""defocus-vlm: 1D causal vision encoders (De-focus ViT / RetNet / Mamba) for multimodal LLMs.

Importing the package registers its configs and models with the transformers Auto* classes
and its presets with timm. Heavy optional packages (deepspeed, datasets, mamba-ssm, ...) are
imported only by the code paths that need them.
"""

from __future__ import annotations

from defocus_vlm.encoders.presets import list_presets

from .configuration_defocus import DefocusVisionConfig
from .image_processing_defocus import DefocusImageProcessor
from .modeling_defocus import (
    DefocusImageClassifierOutput,
    DefocusVisionForImageClassification,
    DefocusVisionModel,
)
from .registration import register_all

__version__ = "0.1.0"

register_all()

__all__ = [
    "DefocusImageClassifierOutput",
    "DefocusImageProcessor",
    "DefocusVisionConfig",
    "DefocusVisionForImageClassification",
    "DefocusVisionModel",
    "list_presets",
]
