"""Backbones: patch embedding, blocks, mixers and presets. No Hugging Face imports here."""

from .config import EncoderConfig
from .model import DefocusEncoder, EncoderState
from .presets import PRESETS, get_preset, list_presets

__all__ = ["PRESETS", "DefocusEncoder", "EncoderConfig", "EncoderState", "get_preset", "list_presets"]
