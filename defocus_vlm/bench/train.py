"""``defocus-vlm bench train``: the img/s of ``train classification``'s own step (its loop, DeepSpeed engine,
EMA, logging and data path) next to a bare PyTorch loop of the same model and augmentation (torchvision v2
per image on uint8 tensors, a plain DataLoader, AdamW, gradient clipping) and timm's ViT of the same dims
in that bare loop. Each step is split into data / fwd / bwd / opt; the project's ``loop`` is the rest of
its step (EMA, logging, LR, seeding). Contenders alternate in rounds, medians over every timed step.

More project contenders: ``pil_data`` (``augment.engine=pil``: the per-image timm path) and one per
``kernels`` spec (a ``DEFOCUS_KERNELS`` value set around its steps, e.g. ``selective_scan=reference``).
The allocator is the process's own: compare a run under ``DEFOCUS_MALLOC_TUNING=0`` with a default one."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

PHASES = ("data", "fwd", "bwd", "opt")


class _PhaseTimer:
    """Stands in for the DeepSpeed engine during one project step: times its forward, backward and step."""

    def __init__(self, engine: Any, times: dict[str, float]):
        self._engine, self._times = engine, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _timed(self, phase: str, fn: Callable, *args, **kwargs) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self._times[phase] += time.perf_counter() - start
        return out

    def __call__(self, *args, **kwargs) -> Any:
        return self._timed("fwd", self._engine, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> Any:
        return self._timed("bwd", self._engine.backward, loss)

    def step(self) -> Any:
        return self._timed("opt", self._engine.step)


class _Project:
    """``train classification``'s Run, stepped one optimiser step at a time."""

    def __init__(self, cfg: Any, name: str, kernels: str | None = None):
        from defocus_vlm.training.classification import ClassificationTask
        from defocus_vlm.training.loop import Run

        # each contender is a run of its own, and a run owns its directory (the run-directory lock)
        train = dataclasses.replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / name))
        cfg = dataclasses.replace(cfg, train=train)
        self.run, self.kernels = Run(ClassificationTask(cfg), cfg), kernels
        self.engine = self.run.engine
        self.engine.train()
        self.batches = self.run.batches()

    def _next(self) -> Any:
        try:
            return next(self.batches)
        except StopIteration:  # the epoch ran out: the next one
            self.run.epoch, self.run.step_in_epoch = self.run.epoch + 1, 0
            self.batches = self.run.batches()
            return next(self.batches)

    def step(self) -> dict[str, float]:
        times = dict.fromkeys(PHASES, 0.0)
        saved = os.environ.get("DEFOCUS_KERNELS")
        if self.kernels:
            os.environ["DEFOCUS_KERNELS"] = self.kernels
        start = time.perf_counter()
        try:
            batches = [self._next() for _ in range(self.run.accum)]
            times["data"] = time.perf_counter() - start
            self.run.engine = _PhaseTimer(self.engine, times)
            self.run.step(batches)
        finally:
            self.run.engine = self.engine
            os.environ.pop("DEFOCUS_KERNELS", None)
            if saved is not None:
                os.environ["DEFOCUS_KERNELS"] = saved
        times["step"] = time.perf_counter() - start
        times["loop"] = times["step"] - sum(times[p] for p in PHASES)
        return times


class _PerImage(Dataset):
    """The bare loop's dataset: uint8 images, one torchvision transform per image (global RNG)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def bare_transform(cfg: Any) -> Callable:
    """The recipe's crop / flip / erase as a plain torchvision v2 pipeline."""
    from torchvision.transforms import v2

    from defocus_vlm.training.augment import mean_std

    d, a = cfg.data, cfg.augment
    ops = [v2.RandomResizedCrop(d.img_size, scale=tuple(a.scale), antialias=True,
                                interpolation=v2.InterpolationMode[d.interpolation.upper()]),
           v2.RandomHorizontalFlip(a.hflip), v2.ToDtype(torch.float32, scale=True), v2.Normalize(*mean_std(d))]
    if a.random_erasing > 0:
        ops.append(v2.RandomErasing(a.random_erasing, value="random"))
    return v2.Compose(ops)


class _Bare:
    """A plain loop: DataLoader -> model -> loss.backward() -> clip -> AdamW."""

    def __init__(self, cfg: Any, model: torch.nn.Module, loss: Callable, data: tuple[torch.Tensor, torch.Tensor]):
        o = cfg.optim
        self.model, self.loss, self.clip = model.train(), loss, o.clip_grad
        self.opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     weight_decay=o.weight_decay)
        self.loader = DataLoader(_PerImage(*data, bare_transform(cfg)), batch_size=cfg.train.batch_size,
                                 shuffle=True, drop_last=True)
        self.batches: Iterator = iter(self.loader)

    def step(self) -> dict[str, float]:
        marks = [time.perf_counter()]
        try:
            x, y = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            x, y = next(self.batches)
        marks.append(time.perf_counter())
        loss = self.loss(self.model, x, y)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        times = {p: b - a for p, a, b in zip(PHASES, marks, marks[1:])}
        return {**times, "step": marks[-1] - marks[0], "loop": 0.0}


def timm_vit(model_config: Any, drop_path: float) -> torch.nn.Module:
    """timm's VisionTransformer with the encoder's dims (patch, width, depth, heads, MLP ratio); for a Mamba
    encoder, whose head count need not divide its width, the largest common divisor of the two."""
    from timm.models.vision_transformer import VisionTransformer

    c = model_config
    return VisionTransformer(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans,
                             num_classes=c.num_labels, embed_dim=c.embed_dim, depth=c.depth,
                             num_heads=math.gcd(c.embed_dim, c.num_heads),
                             mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, drop_path_rate=drop_path)


def _contenders(cfg: Any, overrides: list[str], kernels: list[str], pil: bool, config: str) -> dict[str, Any]:
    from defocus_vlm import DefocusVisionForImageClassification
    from defocus_vlm.data.classification import open_source
    from defocus_vlm.data.decoded import decode_split
    from defocus_vlm.training.augment import smooth_targets
    from defocus_vlm.training.config import load_config

    project = _Project(cfg, "project")
    contenders: dict[str, Any] = {"project": project}
    if pil:
        contenders["pil_data"] = _Project(load_config(config, [*overrides, "augment.engine=pil"],
                                                      stage="classification"), "pil_data")
    for spec in kernels:
        contenders[f"kernels:{spec}"] = _Project(cfg, f"kernels{len(contenders)}", spec)
    d, smoothing = cfg.data, cfg.augment.label_smoothing
    data = decode_split(open_source(d.source, d.path, d.train_split, d.image_column, d.label_column), d.in_chans,
                        d.limit_train)
    if data is None:
        raise ValueError(f"bench train: {d.path} ({d.train_split}) does not decode into one tensor (images of "
                         "several sizes or unreadable ones); point it at a small uniform dataset")
    model_config, drop_path, n = project.run.task.model_config, project.run.ctx.drop_path, len(project.run.task.classes)

    def ours(model, x, y):
        target = smooth_targets(y, n, smoothing) if smoothing else y
        return model(pixel_values=x, labels=target, drop_path_rate=drop_path).loss

    torch.manual_seed(cfg.train.seed)
    contenders["bare"] = _Bare(cfg, DefocusVisionForImageClassification(model_config), ours, data)
    contenders["timm"] = _Bare(cfg, timm_vit(model_config, drop_path),
                               lambda m, x, y: F.cross_entropy(m(x), y, label_smoothing=smoothing), data)
    return contenders


def _summary(samples: list[dict[str, float]], batch: int) -> dict:
    med = {k: statistics.median(s[k] for s in samples) * 1e3 for k in ("step", *PHASES, "loop")}
    return {"img_per_s": round(batch / med["step"] * 1e3, 1), "median_ms": {k: round(v, 2) for k, v in med.items()},
            "steps": len(samples)}


def run_train_benchmark(config: str, overrides: list[str], device: str = "auto", steps: int = 5, rounds: int = 4,
                        kernels: list[str] | None = None, pil: bool = False,
                        progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Interleaved rounds of ``steps`` timed steps per contender (after one untimed warm-up each)."""
    from defocus_vlm.training.batch_augment import batch_augment_blocker
    from defocus_vlm.training.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        fixed = ["train.progress=false", "train.tensorboard=false", "data.verify=0", f"train.output_dir={tmp}"]
        overrides = [*overrides, *fixed]
        cfg = load_config(config, overrides, stage="classification")
        blocker = batch_augment_blocker(cfg.data, cfg.augment)
        if blocker:  # the bare loop's torchvision pipeline would not be the same augmentation
            raise ValueError(f"bench train compares the crop / flip / erase recipe, but {blocker}")
        load_before = os.getloadavg()
        contenders = _contenders(cfg, overrides, kernels or [], pil, config)
        engine_device = contenders["project"].engine.device
        if device != "auto" and torch.device(device).type != engine_device.type:
            raise ValueError(f"bench train: --device {device} asked for, but the training engine runs on "
                             f"{engine_device}")
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
        for c in contenders.values():
            c.step()  # warm-up
        names = list(contenders)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                samples[name] += [contenders[name].step() for _ in range(steps)]
                ms = statistics.median(s["step"] for s in samples[name]) * 1e3
                progress(f"round {r + 1}/{rounds} {name}: {ms:.0f} ms")
    batch = cfg.train.batch_size
    result = {name: _summary(s, batch) for name, s in samples.items()}
    med = {name: r["median_ms"] for name, r in result.items()}
    ratios = {"step_project_vs_bare": med["project"]["step"] / med["bare"]["step"],
              "step_project_vs_timm": med["project"]["step"] / med["timm"]["step"],
              "data_project_vs_bare": med["project"]["data"] / med["bare"]["data"],
              "fwd_bwd_project_vs_timm": (med["project"]["fwd"] + med["project"]["bwd"])
              / (med["timm"]["fwd"] + med["timm"]["bwd"]),
              "loop_share_of_project_step": med["project"]["loop"] / med["project"]["step"]}
    return {"config": config, "overrides": overrides[: -len(fixed)], "device": str(engine_device), "batch": batch,
            "threads": torch.get_num_threads(), "rounds": rounds, "steps_per_round": steps,
            "allocator": os.environ.get("GLIBC_TUNABLES") or "glibc default",
            "load_average_1min": [load_before[0], os.getloadavg()[0]], "torch": torch.__version__,
            "contenders": result, "ratios": {k: round(v, 3) for k, v in ratios.items()},
            "note": "time ratios (> 1: the project is slower); medians of every timed step, contenders interleaved"}


def table(result: dict) -> str:
    """The contenders as a text table (img/s and the phase split)."""
    cols = ("step", *PHASES, "loop")
    lines = [f"{'contender':<34}{'img/s':>8}" + "".join(f"{c + ' ms':>10}" for c in cols)]
    for name, r in result["contenders"].items():
        lines.append(f"{name:<34}{r['img_per_s']:>8.1f}" + "".join(f"{r['median_ms'][c]:>10.2f}" for c in cols))
    lines += [f"{k}: {v:.3f}" for k, v in result["ratios"].items()]
    return "\n".join(lines)
