"""Export a trained classifier as a Hugging Face directory: safetensors weights, config with
``id2label``, and the image processor, so ``AutoModelForImageClassification.from_pretrained``
and ``pipeline("image-classification")`` load it."""

from __future__ import annotations

from pathlib import Path

import torch


def export_classifier(config, state_dict: dict[str, torch.Tensor], processor, out_dir: str | Path) -> Path:
    from defocus_vlm import DefocusVisionForImageClassification

    out_dir = Path(out_dir)
    model = DefocusVisionForImageClassification(config)
    own = model.state_dict()
    missing = set(own) - set(state_dict)
    if missing:
        raise ValueError(f"cannot export: weights missing for {sorted(missing)[:5]}")
    model.load_state_dict({k: state_dict[k].detach().float().cpu() for k in own})
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
