"""LoRA for the VLM's language model (peft): apply, export as adapter + base, reload, merge.

A LoRA run exports a peft adapter directory (``adapter_config.json``, ``adapter_model.safetensors``)
holding only the low-rank weights, with the model they apply to in its ``base/`` subfolder: the
VLM with everything else as trained (projector, encoder when unfrozen) and the language model's
original weights, plus the processor. :func:`merge_lora` folds the adapter into those weights and
writes one plain VLM directory (``AutoModelForImageTextToText`` loads it)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import ProcessorMixin

BASE_DIR = "base"
ADAPTER_CONFIG = "adapter_config.json"


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def apply_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str],
               trainable: list[torch.nn.Module] = ()) -> torch.nn.Module:
    """Wrap ``model`` (a DefocusVLMForConditionalGeneration) in a peft model with LoRA on the language
    model's ``target_modules`` (module names such as ``q_proj``; the encoder is never targeted).
    peft freezes every other weight; ``trainable`` modules (the projector, the encoder when it is
    fine-tuned) are made trainable again and are saved with the base model."""
    from peft import LoraConfig, get_peft_model

    prefix = re.escape(_module_name(model, model.language_model))
    names = "|".join(re.escape(t) for t in target_modules)
    pattern = rf"{prefix}\..*\.({names})"
    matched = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    if not matched:
        raise ValueError(f"LoRA target_modules {target_modules} match no module of the language model "
                         f"({type(model.language_model).__name__})")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    peft_model = get_peft_model(model, config)
    for module in trainable:
        module.requires_grad_(True)
    return peft_model


def base_state_dict(peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapped model's own weights from a peft model's state dict: LoRA tensors dropped, the
    ``base_model.model.`` prefix and the ``.base_layer`` wrapping removed."""
    out = {}
    for key, value in peft_state.items():
        if ".lora_" in key:
            continue
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[key] = value
    return out


def export_lora(peft_model: PeftModel, state: dict[str, torch.Tensor], base_model: torch.nn.Module,
                processor: ProcessorMixin, out_dir: str | os.PathLike) -> Path:
    """Write the adapter of ``peft_model`` (weights from ``state``, its full state dict) to ``out_dir``
    and ``base_model`` (an unwrapped VLM of the same config) loaded with the base weights to ``out_dir/base``."""
    out_dir = Path(out_dir)
    base_model.load_state_dict({k: v.detach().float().cpu() for k, v in base_state_dict(state).items()})
    base_model.eval().save_pretrained(out_dir / BASE_DIR, safe_serialization=True)
    processor.save_pretrained(out_dir / BASE_DIR)
    peft_model.peft_config["default"].base_model_name_or_path = str((out_dir / BASE_DIR).resolve())
    peft_model.save_pretrained(out_dir, state_dict=state, save_embedding_layers=False)
    return out_dir


def base_dir_of(adapter_dir: str | os.PathLike) -> Path:
    """The base model of an adapter: its ``base/`` subfolder, else ``base_model_name_or_path``."""
    import json

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"no LoRA adapter at {adapter_dir}: {ADAPTER_CONFIG} missing")
    if (adapter_dir / BASE_DIR / "config.json").is_file():
        return adapter_dir / BASE_DIR
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"the base model of {adapter_dir} was not found: no {BASE_DIR}/ folder and "
                                f"base_model_name_or_path is {base!r}")
    return Path(base)


def load_lora(adapter_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[PeftModel, ProcessorMixin]:
    """(peft model, processor) of an exported adapter directory, ready for inference."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import defocus_vlm  # noqa: F401 - registers the Auto classes

    base_dir = base_dir_of(adapter_dir)
    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), AutoProcessor.from_pretrained(base_dir)


def merge_lora(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Fold the adapter into its base model and write a plain VLM directory with the processor."""
    model, processor = load_lora(adapter_dir)
    merged = model.merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
