"""Export of a trained model as a Hugging Face directory (safetensors weights, config, processor), the
step every stage ends with: ``from_pretrained`` / ``AutoModel*`` / ``pipeline`` load it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import ProcessorMixin
    from transformers.image_processing_utils import BaseImageProcessor


def export_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                 processor: ProcessorMixin | BaseImageProcessor, out_dir: str | Path) -> Path:
    """Load ``state_dict`` (the trained weights, any dtype/device) into ``model`` (a freshly built model of
    the trained config) in float32, and save it with ``processor`` to ``out_dir``."""
    out_dir = Path(out_dir)
    own = model.state_dict()
    missing = set(own) - set(state_dict)
    if missing:
        raise ValueError(f"cannot export: weights missing for {sorted(missing)[:5]}")
    model.load_state_dict({k: state_dict[k].detach().float().cpu() for k in own})
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
