"""Synthetic classification data for throughput runs of the real training loop.

:class:`SyntheticClassificationTask` is the classification stage (same model, loss, DeepSpeed engine,
ZeRO stage, precision, optimiser, LR schedule and logging, all from :func:`run_stage`) fed with random
images that already sit on the device: no decoding, augmentation or host-to-device copy is timed, so
the images/s measured is that of the training step. ``train.max_steps`` fixes the number of steps.
It records when each step ended, for :meth:`SyntheticClassificationTask.images_per_second`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from .augment import build_mixup
from .classification import ClassificationRunConfig, ClassificationTask, build_model_config
from .engine import batch_layout, device
from .loop import StepContext

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def synthetic_batches(count: int, batch: int, channels: int, size: int, classes: int, seed: int,
                      dev: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (images, labels) batches of standard-normal pixels, made once and kept on ``dev``.
    The same arguments give the same tensors, so a baseline loop can train on identical data."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, channels, size, size, generator=g).to(dev),
             torch.randint(0, classes, (batch,), generator=g).to(dev)) for _ in range(count)]


class IndexDataset(Dataset):
    """``length`` samples that are only their sampler item: the task's collate replaces each batch of
    them with the next of its pre-made device batches (the loop keeps its sampler and DataLoader)."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item):
        return item


class SyntheticClassificationTask(ClassificationTask):
    name = "classification (synthetic data)"

    def __init__(self, cfg: ClassificationRunConfig, num_classes: int = 1000, pool: int = 2,
                 rank: int = 0, world: int = 1):
        super().__init__(cfg, rank, world)
        self.num_classes, self.pool_size = num_classes, pool
        self.step_ends: list[float] = []
        self.served = 0

    def build_data(self) -> IndexDataset:
        cfg, d, t = self.cfg, self.cfg.data, self.cfg.train
        self.classes = [str(i) for i in range(self.num_classes)]
        self.model_config = build_model_config(cfg, self.classes)
        self.mixup = build_mixup(cfg.augment, self.num_classes)  # on the device tensors, as in a real run
        self.counters.setdefault("skipped_images", 0)
        self.micro, _ = batch_layout(t.batch_size, t.micro_batch_size, self.world)
        self.pool = synthetic_batches(self.pool_size, self.micro, d.in_chans, d.img_size, self.num_classes,
                                      t.seed + self.rank, device())
        steps = t.max_steps or 1
        return IndexDataset(steps * t.batch_size)

    def collate_fn(self) -> Callable[[list[Any]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        def collate(items: list):
            images, labels = self.pool[self.served % len(self.pool)]
            self.served += 1
            return images, labels, torch.zeros(len(items), dtype=torch.long)  # no skipped images

        return collate

    def describe(self, model: torch.nn.Module) -> str:
        return (f"{self.name}: {self.model_config.preset} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                f"params | {self.pool_size} random batches of {self.micro} on {device()}")

    def train_step(self, engine: DeepSpeedEngine, batches: list, ctx: StepContext) -> float:
        loss = super().train_step(engine, batches, ctx)  # reads the loss back: the device has finished the step
        self.step_ends.append(time.perf_counter())
        return loss

    def evaluate(self, model: torch.nn.Module, ctx: StepContext) -> dict:
        return {}  # random labels: nothing to measure

    def export(self, state: dict, out_dir: Path) -> None:
        return None  # a throughput run keeps no model

    def images_per_second(self, warmup_steps: int) -> float:
        """Steady-state rate over the steps after the first ``warmup_steps`` (compilation, autotuning)."""
        ends = self.step_ends
        if len(ends) <= warmup_steps or warmup_steps < 1:
            raise ValueError(f"need more than {warmup_steps} >= 1 recorded steps, have {len(ends)}")
        return (len(ends) - warmup_steps) * self.cfg.train.batch_size / (ends[-1] - ends[warmup_steps - 1])
