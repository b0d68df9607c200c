"""AdamW with the paper's parameter groups: no weight decay on 1-D tensors, biases, and the parameters
a module names in its ``no_weight_decay()`` (timm's convention: names relative to that module; the
encoder declares its class token and position embedding, the Mamba mixer ``A_log`` and its RoPE
frequencies, the band-pass filter its decay and RoPE frequencies)."""

from __future__ import annotations

import torch

from .config import OptimConfig


def declared_no_weight_decay(model: torch.nn.Module) -> set[str]:
    """Full names of the parameters that the modules of ``model`` keep out of weight decay."""
    names = set()
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if callable(declare):
            names |= {f"{prefix}.{name}" if prefix else name for name in declare()}
    return names


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decay group, no-decay group] of the trainable parameters, each with its parameter ``names``."""
    skip = declared_no_weight_decay(model)
    groups = [{"params": [], "weight_decay": weight_decay, "names": []},
              {"params": [], "weight_decay": 0.0, "names": []}]
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = groups[p.ndim <= 1 or name.endswith(".bias") or name in skip]
            group["params"].append(p)
            group["names"].append(name)
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, cfg.weight_decay)]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
