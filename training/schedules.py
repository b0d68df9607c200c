"""Per-iteration learning rate and per-epoch drop path (PAPER.md §3)."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int, reference: int = 512) -> float:
    """Linear scaling rule: base LR at ``reference`` images per step."""
    return base_lr * global_batch / reference


def lr_at(
    step: int, total_steps: int, warmup_steps: int, peak_lr: float, warmup_lr: float, min_lr: float
) -> float:
    """Linear warm-up from ``warmup_lr`` to ``peak_lr`` over ``warmup_steps``, then cosine from
    ``peak_lr`` to ``min_lr`` at ``total_steps`` (both per optimiser step)."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def drop_path_at(epoch: int, epochs: int, p_min: float, p_max: float, schedule: str = "linear") -> float:
    """Scheduled drop path: p(e) = p_min + e / (E - 1) * (p_max - p_min), rising per epoch;
    "constant" gives p_max throughout. Layer i then uses linspace(0, p(e), depth)[i]."""
    if schedule == "constant":
        return p_max
    if schedule != "linear":
        raise ValueError(f"drop path schedule must be 'linear' or 'constant', got {schedule!r}")
    if epochs <= 1:
        return p_max
    return p_min + min(epoch, epochs - 1) / (epochs - 1) * (p_max - p_min)
