"""Stage 1: classification pretraining (PAPER.md §3) on the shared DeepSpeed loop (training/loop.py).

``run(cfg, resume=False)`` trains, checkpoints, evaluates (raw and EMA) and exports; it returns
a summary with the per-step losses (used by the tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.utils.data import DataLoader

from defocus_vlm.compat import enable_activation_checkpointing
from defocus_vlm.configuration_defocus import AUX_LOSSES
from defocus_vlm.data.classification import ClassificationDataset, open_source, verify_source
from defocus_vlm.data.decoded import DECODE_MAX_BYTES, DecodedDataset, collate_batch, decode_split

from .augment import EvalTransform, TrainTransform, build_mixup, image_processor, make_targets, mean_std
from .batch_augment import BatchAugment, batch_augment_blocker
from .config import AugmentConfig, ConfigError, DataConfig, OptimConfig, RunConfig, TrainConfig, VisionTowerConfig
from .engine import all_reduce_sum, batch_layout
from .export import export_model
from .fields import choice
from .loop import StageTask, StepContext, reduce_count, run_stage
from .towers import is_export, load_encoder, load_weights, refuse_reshaped, saved_model_type, tower_config

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from defocus_vlm.configuration_defocus import DefocusVisionConfig


@dataclass
class ClassifierConfig:
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    aux_loss: str = choice("pooled", *AUX_LOSSES)  # "pooled" (paper) | "token" (official code) | "none"
    gradient_checkpointing: bool = False  # recompute block activations in backward (less memory, ~30 % slower)


@dataclass
class ClassificationRunConfig(RunConfig):
    stage: str = "classification"  # the stage this file configures (checked against the command)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    moved: ClassVar[dict[str, str]] = {
        "model.preset": "model.vision.source", "model.init_from": "model.vision.source",
        "model.patch_size": "model.vision.overrides.patch_size", "model.overrides": "model.vision.overrides"}


class _EvalSampler(torch.utils.data.Sampler):
    """Every ``world``-th index, no padding (so no sample is counted twice)."""

    def __init__(self, n: int, world: int, rank: int):
        self.idx = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.idx)

    def __iter__(self):
        return iter(self.idx)


def build_model_config(cfg: ClassificationRunConfig, classes: list[str], saved: Any = None) -> DefocusVisionConfig:
    """The classifier's DefocusVisionConfig: the tower's (a preset's, or an export's ``saved`` config) with
    ``model.vision.overrides``, and the classes, image size and channels of the data."""
    id2label = {i: name for i, name in enumerate(classes)}
    return tower_config(cfg.model.vision, saved, num_labels=len(classes), img_size=cfg.data.img_size,
                        in_chans=cfg.data.in_chans, aux_loss=cfg.model.aux_loss, id2label=id2label,
                        label2id={v: k for k, v in id2label.items()})


class ClassificationTask(StageTask):
    name = "classification"
    curve_metric = "top1"

    def build_data(self) -> ClassificationDataset:
        cfg, d = self.cfg, self.cfg.data
        train_src = open_source(d.source, d.path, d.train_split, d.image_column, d.label_column)
        val_src = open_source(d.source, d.path, d.val_split, d.image_column, d.label_column)
        if d.verify:
            verify_source(train_src, d.verify, "train", d.on_corrupt, d.limit_train)
            verify_source(val_src, d.verify, "val", d.on_corrupt, d.limit_val)
        self.classes = train_src.classes
        self.val_ds = ClassificationDataset(val_src, EvalTransform(d), d.on_corrupt, d.limit_val)
        self.mixup = build_mixup(cfg.augment, len(self.classes))
        micro, _ = batch_layout(cfg.train.batch_size, cfg.train.micro_batch_size, self.world)
        if self.mixup is not None and micro % 2:
            raise ConfigError(f"mixup/cutmix need an even micro batch, got {micro}")
        self.counters.setdefault("skipped_images", 0)
        decoded = self._decoded_train(train_src)
        self.batched = decoded is not None  # the DataLoader then gets whole batches from the dataset
        if decoded is not None:
            return decoded
        return ClassificationDataset(train_src, TrainTransform(d, cfg.augment), d.on_corrupt, d.limit_train)

    def _decoded_train(self, train_src) -> DecodedDataset | None:
        """The training split as one uint8 tensor with the batch augmentation (augment.engine), or None."""
        d, aug = self.cfg.data, self.cfg.augment
        blocker = batch_augment_blocker(d, aug)
        if aug.engine == "pil" or (aug.engine == "auto" and blocker):
            return None
        if blocker:
            raise ConfigError(f"augment.engine=batch cannot run this recipe: {blocker}")
        decoded = decode_split(train_src, d.in_chans, d.limit_train)
        if decoded is None:
            if aug.engine == "batch":
                raise ConfigError(f"augment.engine=batch: {d.path} ({d.train_split}) cannot be decoded into one "
                                  f"tensor (images of several sizes, an unreadable image, or over "
                                  f"{DECODE_MAX_BYTES >> 30} GiB); use augment.engine=pil")
            return None
        return DecodedDataset(*decoded, BatchAugment(d, aug, *mean_std(d)), self.classes)

    def collate_fn(self) -> Callable[[Any], Any] | None:
        return collate_batch if self.batched else None

    def build_model(self) -> torch.nn.Module:
        from defocus_vlm import DefocusVisionConfig
        from defocus_vlm import DefocusVisionForImageClassification as Classifier

        m = self.cfg.model
        v = m.vision
        if not is_export(v):
            self.model_config = build_model_config(self.cfg, self.classes)
            model = Classifier(self.model_config)
        elif saved_model_type(v) == "defocus_vision":  # a classifier (its head is kept if the classes fit)
            saved = DefocusVisionConfig.from_pretrained(v.source)
            self.model_config = build_model_config(self.cfg, self.classes, saved)
            model, info = Classifier.from_pretrained(v.source, config=self.model_config, ignore_mismatched_sizes=True,
                                                     output_loading_info=True)
            refuse_reshaped(v, [m for m in info["mismatched_keys"] if not m[0].startswith(("head.", "aux_head."))])
        else:  # a CLIP model's or a VLM's encoder under a new head
            encoder = load_encoder(v, apply_overrides=False)
            self.model_config = build_model_config(self.cfg, self.classes, encoder.config)
            model = Classifier(self.model_config)
            load_weights(model.defocus, encoder, v)
        if v.freeze:
            model.defocus.requires_grad_(False)
        if m.gradient_checkpointing:
            enable_activation_checkpointing(model)
        return model

    def describe(self, model: torch.nn.Module) -> str:
        return (
            f"classification: {self.model_config.preset} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"params | {len(self.val_ds)} val images, {len(self.classes)} classes"
        )

    def train_step(self, engine: DeepSpeedEngine, batches: list, ctx: StepContext) -> float:
        skipped = sum(int(b[2].gt(0).sum()) for b in batches)
        self.counters["skipped_images"] += reduce_count(skipped)
        return super().train_step(engine, batches, ctx)

    def micro_loss(self, engine: DeepSpeedEngine, batch: Sequence[torch.Tensor], ctx: StepContext) -> torch.Tensor:
        x, y, _ = batch
        x, target = make_targets(x, y, self.mixup, self.cfg.augment, len(self.classes))
        out = engine(pixel_values=x.to(ctx.device, ctx.dtype), labels=target.to(ctx.device),
                     drop_path_rate=ctx.drop_path)
        return out.loss

    def sampler_repeats(self) -> int:
        return self.cfg.augment.repeated_aug

    def evaluate(self, model: torch.nn.Module, ctx: StepContext) -> dict:
        from defocus_vlm.eval.classification import evaluate

        t = self.cfg.train
        loader = DataLoader(self.val_ds, batch_size=t.eval_batch_size, num_workers=self.num_workers(),
                            sampler=_EvalSampler(len(self.val_ds), ctx.world, ctx.rank))
        return evaluate(model, loader, ctx.device, ctx.dtype, reduce=all_reduce_sum)

    def summary_line(self, metrics: dict) -> str:
        text = f"val top-1 {metrics['raw']['top1']:.2f}"
        return text + (f" (EMA {metrics['ema']['top1']:.2f})" if "ema" in metrics else "")

    def export(self, state: dict, out_dir: Path) -> None:
        from defocus_vlm import DefocusVisionForImageClassification

        export_model(DefocusVisionForImageClassification(self.model_config), state, image_processor(self.cfg.data),
                     out_dir)


def run(cfg: ClassificationRunConfig, resume: bool = False) -> dict:
    return run_stage(ClassificationTask(cfg), cfg, resume)
