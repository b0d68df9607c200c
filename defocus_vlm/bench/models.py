"""``defocus-vlm bench models``: the model alone (random images, no data, no optimiser) of one classification
config and of variants of it, beside timm's ViT of the same dims, forward + loss + backward (or inference
only), the contenders alternating call by call, medians. What it answers: what each piece of a De-focus model
costs (switch it off in a variant) and how far the model is from timm's ViT at the same size."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .encoders import kernel_backends
from .timing import time_interleaved

KERNELS_KEY = "kernels="  # a variant item that sets DEFOCUS_KERNELS around the variant's calls


def parse_variant(spec: list[str]) -> tuple[str, list[str], str | None]:
    """``NAME [KEY=VALUE ...] [kernels=SPEC]`` -> (name, run-config overrides, DEFOCUS_KERNELS value)."""
    name, *items = spec
    if "=" in name or not name:
        raise ValueError(f"--variant {' '.join(spec)}: expected a name first, then KEY=VALUE overrides")
    kernels = [item[len(KERNELS_KEY):] for item in items if item.startswith(KERNELS_KEY)]
    if len(kernels) > 1:
        raise ValueError(f"--variant {name}: one kernels=SPEC at most, got {len(kernels)}")
    return name, [item for item in items if not item.startswith(KERNELS_KEY)], kernels[0] if kernels else None


class _Contender:
    """One model and the call that times it (a scalar loss to differentiate, or logits in inference)."""

    def __init__(self, model: torch.nn.Module, project: bool, inference: bool, kernels: str | None,
                 pixels: torch.Tensor, labels: torch.Tensor):
        self.model = model.train(not inference)
        self.project, self.inference, self.kernels = project, inference, kernels
        self.pixels, self.labels = pixels, labels

    def __call__(self) -> torch.Tensor:
        with kernel_backends(self.kernels), torch.inference_mode(self.inference):
            if self.project:
                out = self.model(pixel_values=self.pixels, labels=None if self.inference else self.labels,
                                 drop_path_rate=0.0)
                return out.logits if self.inference else out.loss
            logits = self.model(self.pixels)
            return logits if self.inference else F.cross_entropy(logits, self.labels)


def run_model_benchmark(config: str, overrides: list[str], variants: list[list[str]], timm: bool = True,
                        inference: bool = False, batch_size: int | None = None, repeats: int = 9,
                        device: str = "cpu", num_classes: int = 10,
                        progress: Callable[[str], None] | None = None) -> dict:
    """The config as is (``base``), each variant (its overrides on top), and timm's ViT of ``base``'s dims."""
    from defocus_vlm import DefocusVisionForImageClassification
    from defocus_vlm.training.classification import build_model_config
    from defocus_vlm.training.config import load_config

    from .train import timm_vit

    dev = torch.device(device)
    classes = [str(i) for i in range(num_classes)]
    specs = [("base", [], None)] + [parse_variant(v) for v in variants]
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names) or "timm" in names:
        raise ValueError(f"--variant names must be unique and not 'base' or 'timm', got {names[1:]}")
    torch.manual_seed(0)
    models: dict[str, tuple[torch.nn.Module, bool, str | None, list[str]]] = {}
    for name, extra, kernels in specs:
        cfg = load_config(config, [*overrides, *extra], stage="classification")
        batch_size = batch_size or cfg.train.batch_size
        models[name] = (DefocusVisionForImageClassification(build_model_config(cfg, classes)), True, kernels, extra)
    base_config = models["base"][0].config
    shape = (base_config.in_chans, base_config.img_size)
    for name, (model, *_rest) in models.items():  # one batch of images feeds every contender
        own = (model.config.in_chans, model.config.img_size)
        if own != shape:
            raise ValueError(f"--variant {name}: (channels, image size) {own} differs from the config's {shape}; "
                             "every contender times the same images")
    if timm:
        models["timm"] = (timm_vit(base_config, 0.0), False, None, [])
    pixels = torch.randn(batch_size, base_config.in_chans, base_config.img_size, base_config.img_size, device=dev)
    labels = torch.randint(0, num_classes, (batch_size,), device=dev)
    calls = {name: _Contender(model.to(dev), project, inference, kernels, pixels, labels)
             for name, (model, project, kernels, _) in models.items()}
    leaves = tuple(p for model, *_ in models.values() for p in model.parameters())
    if progress:
        progress(f"{', '.join(calls)}: {'inference' if inference else 'forward + backward'}, {repeats} rounds")
    load = os.getloadavg()[0]
    timed = time_interleaved(calls, not inference, dev, repeats, leaves=leaves)
    first = timed["base"][0]
    rows: dict[str, Any] = {}
    for name, (ms, mem) in timed.items():
        model, _, kernels, extra = models[name]
        rows[name] = {"overrides": extra, "kernels": kernels, "median_ms": round(ms, 2), "mem_mb": round(mem, 1),
                      "params": sum(p.numel() for p in model.parameters()),
                      "ratio_vs_base": round(ms / first, 3)}
        if timm:
            rows[name]["ratio_vs_timm"] = round(ms / timed["timm"][0], 3)
    return {"config": config, "overrides": overrides, "mode": "inference" if inference else "forward+backward",
            "device": str(dev), "batch": batch_size, "img_size": base_config.img_size,
            "threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__,
            "load_average_1min": [load, os.getloadavg()[0]],
            "memory": "peak allocated (CUDA)" if dev.type == "cuda" else "bytes saved for backward (CPU)",
            "contenders": rows}


def table(result: dict) -> str:
    """The contenders as a Markdown table."""
    has_timm = "timm" in result["contenders"]
    head = "| contender | ms (median) | vs base |" + (" vs timm |" if has_timm else "")
    lines = [head, "|---" * (4 if has_timm else 3) + "|"]
    for name, row in result["contenders"].items():
        lines.append(f"| {name} | {row['median_ms']} | {row['ratio_vs_base']}x |"
                     + (f" {row['ratio_vs_timm']}x |" if has_timm else ""))
    return "\n".join(lines)

