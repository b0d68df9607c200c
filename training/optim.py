"""AdamW with the paper's parameter groups: no weight decay on 1-D tensors, biases, Mamba's
``A_log``, RoPE frequencies, decay parameters, the class token and position embeddings."""

from __future__ import annotations

import torch

from .config import OptimConfig

DEFAULT_NO_DECAY = ("A_log", "freq", "decay_log", "rope_freq", "cls_token", "pos_embed")


def no_weight_decay(name: str, param: torch.Tensor, names=DEFAULT_NO_DECAY) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in names)


def param_groups(model: torch.nn.Module, weight_decay: float, names=DEFAULT_NO_DECAY) -> list[dict]:
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p, names):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = [
        {k: v for k, v in g.items() if k != "names"}
        for g in param_groups(model, cfg.weight_decay, tuple(cfg.no_decay_names))
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
