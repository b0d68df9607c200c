"""Run configuration: a YAML file plus ``dotted.key=value`` overrides, checked into dataclasses.

Every item of the paper's recipe (PAPER.md §3) is a field here, so a run or an ablation is a
config file, never a code edit. Unknown keys and wrongly typed values are refused with one
clear message naming the key (and the closest known key)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A run configuration that cannot be used, with the key and the reason."""


@dataclass
class ModelConfig:
    """preset: a name from ``defocus-vlm presets``; overrides: any DefocusVisionConfig field
    (embed_dim, depth, decay, rope, ...). img_size / in_chans / num_labels come from the data."""

    preset: str = "defocus_mamba_tiny"
    patch_size: int = 16  # patch side in pixels
    aux_loss: str = "pooled"  # "pooled" (paper) | "token" (official code) | "none"
    overrides: dict = field(default_factory=dict)  # preset fields to change (embed_dim, depth, decay, rope, ...)
    gradient_checkpointing: bool = False  # recompute block activations in backward (less memory, ~30 % slower)
    init_from: str | None = None  # an HF directory to start from (fine-tuning)


@dataclass
class ImageDataConfig:
    """Image decoding, preprocessing and limits shared by the data sections of every image stage."""

    img_size: int = 224  # training / evaluation resolution
    in_chans: int = 3  # 1 (grey) or 3 (RGB); images are converted to this
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, then centre-crop img_size
    mean: list | None = None  # normalisation mean per channel (null: ImageNet's, or 0.5 for grey)
    std: list | None = None  # normalisation std per channel (null: ImageNet's, or 0.5 for grey)
    interpolation: str = "bicubic"  # resize filter (bicubic, bilinear, ...)
    num_workers: int = 0  # DataLoader worker processes
    on_corrupt: str = "skip"  # "skip" (replace with the next image, count it) | "fail"
    verify: int = 64  # images decoded per split before training (-1 = all, 0 = none)
    limit_train: int = 0  # use only the first N training samples (0 = all): tiny/debug runs
    limit_val: int = 0  # use only the first N validation samples (0 = all)


@dataclass
class DataConfig(ImageDataConfig):
    """source: "fashion_mnist" (IDX files under ``path``), "imagefolder" (``path``/train/<class>/...),
    "hf" (a ``save_to_disk`` directory or a dataset loadable by ``datasets.load_dataset(path)``)
    or "auto" (decided from what ``path`` contains)."""

    source: str = "auto"
    path: str = FASHION_MNIST_DIR  # dataset location (see source)
    train_split: str = "train"  # split / folder name used for training
    val_split: str = "val"  # split / folder name used for validation
    image_column: str = "image"  # image column of a datasets dataset
    label_column: str = "label"  # label column of a datasets dataset
@dataclass
class AugmentConfig:
    """DeiT / paper recipe; all from timm. mixup/cutmix are the Beta alphas (0 = off)."""

    scale: list = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5  # horizontal flip probability
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec (null = off)
    color_jitter: float = 0.4  # colour jitter strength (0 = off)
    random_erasing: float = 0.25  # random erasing probability
    mixup: float = 0.8  # mixup Beta alpha (0 = off)
    cutmix: float = 1.0  # cutmix Beta alpha (0 = off)
    mixup_prob: float = 1.0  # probability of applying mixup or cutmix to a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.1  # label smoothing of the (mixed) targets
    repeated_aug: int = 3  # repeats per sample (timm RepeatAugSampler); 0 or 1 = off


@dataclass
class OptimConfig:
    """AdamW; the LR is ``lr * global_batch / lr_batch_ref``; warm-up then cosine, per iteration."""

    lr: float = 5e-4  # base learning rate (per lr_batch_ref images when scale_lr)
    lr_batch_ref: int = 512  # reference global batch of the LR scaling rule
    scale_lr: bool = True  # peak LR = lr * global batch / lr_batch_ref
    weight_decay: float = 0.05  # AdamW weight decay (not on 1-D tensors, biases or modules' no_weight_decay())
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW eps
    warmup_epochs: float = 20.0  # linear warm-up length in epochs (fractions allowed), then cosine per step
    warmup_lr: float = 5e-7  # LR at the first warm-up step
    min_lr: float = 5e-6  # LR at the end of the cosine
    clip_grad: float = 10.0  # gradient-norm clipping (0 = off)


@dataclass
class TrainConfig:
    epochs: int = 300  # passes over the training data (with max_steps, whichever ends first)
    batch_size: int = 512  # global: micro_batch_size * world_size * gradient accumulation
    micro_batch_size: int = 0  # per process; 0 = batch_size / world_size (no accumulation)
    max_steps: int = 0  # stop after N optimiser steps (0 = epochs decide): fixed-budget runs
    stop_after: int = 0  # checkpoint and exit after global step N, schedule unchanged (time-sliced jobs)
    drop_path_min: float = 0.1  # drop-path rate of the first epoch
    drop_path_max: float = 0.7  # drop-path rate of the last epoch (the paper's rising schedule)
    drop_path_schedule: str = "linear"  # "linear" (rising per epoch, the paper) | "constant" (= max)
    ema_decay: float = 0.9999  # 0 = no EMA
    seed: int = 0  # seed of the model init, the data order and every step's augmentation
    deepspeed: str = "zero2"  # a name in configs/deepspeed/ or a path to a JSON file
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    cpu_threads: int = 0  # torch intra-op threads (0 = torch's default); 1 is fastest on a busy CPU
    checkpoint_every: int = 0  # optimiser steps between checkpoints (0 = only at epoch ends)
    keep_checkpoints: int = 2  # checkpoints kept on disk (oldest removed)
    eval_every: int = 1  # epochs between validation passes (0 = only at the end)
    eval_batch_size: int = 256  # batch size of the validation passes
    log_every: int = 10  # steps between log lines when the progress bar is off
    output_dir: str = "runs/classification"  # run directory: config, checkpoints, logs, metrics, exported model
    tensorboard: bool = True  # write TensorBoard scalars under output_dir/tensorboard
    progress: bool = True  # show a progress bar (loss, LR, throughput, ETA)
@dataclass
class ClassificationRunConfig:
    stage: str = "classification"  # the stage this file configures (checked against the command)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        t, d, a = self.train, self.data, self.augment
        checks = [
            (t.batch_size > 0, "train.batch_size must be positive"),
            (t.epochs > 0, "train.epochs must be positive"),
            (
                0 <= t.drop_path_min <= t.drop_path_max < 1,
                "need 0 <= train.drop_path_min <= train.drop_path_max < 1",
            ),
            (
                t.drop_path_schedule in ("linear", "constant"),
                "train.drop_path_schedule must be 'linear' or 'constant'",
            ),
            (0 <= t.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
            (t.precision in ("auto", "bf16", "fp32"), "train.precision must be auto, bf16 or fp32"),
            (d.on_corrupt in ("skip", "fail"), "data.on_corrupt must be 'skip' or 'fail'"),
            (
                d.source in ("auto", "fashion_mnist", "imagefolder", "hf"),
                "data.source must be auto, fashion_mnist, imagefolder or hf",
            ),
            (d.in_chans in (1, 3), "data.in_chans must be 1 or 3"),
            (
                self.model.aux_loss in ("pooled", "token", "none"),
                "model.aux_loss must be pooled, token or none",
            ),
            (0 <= a.label_smoothing < 1, "augment.label_smoothing must be in [0, 1)"),
            (self.optim.min_lr >= 0 and self.optim.lr > 0, "optim.lr must be positive, optim.min_lr >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# stage -> its run-config dataclass, or "module:Class" under defocus_vlm.training (imported lazily, so
# stage modules can import this file). Every run config has ``optim: OptimConfig``, ``train: TrainConfig``
# and a ``validate()`` method.
STAGE_CONFIGS: dict[str, type | str] = {"classification": ClassificationRunConfig,
                                        "instruct": "instruct:InstructRunConfig",
                                        "clip": "clip:ClipRunConfig"}


def stage_config_class(stage: str) -> type:
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGE_CONFIGS)}")
    entry = STAGE_CONFIGS[stage]
    if isinstance(entry, str):
        import importlib

        module, name = entry.split(":")
        entry = getattr(importlib.import_module(f"defocus_vlm.training.{module}"), name)
    return entry


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Coerce YAML scalars to the annotated type (int -> float allowed) or raise ConfigError."""
    hint = (
        annotation if not isinstance(annotation, str) else eval(annotation, vars(typing) | {"types": types})
    )  # noqa: S307
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: a value is required, got null")
    for opt in options:
        base = typing.get_origin(opt) or opt
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base is str and isinstance(value, str):
            return value
        if base in (list, dict) and isinstance(value, base):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{key}: expected {wanted}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict, prefix: str, base: Any = None) -> Any:
    """``cls`` from ``values``; keys not given keep ``base``'s values (the field's own default, e.g. a
    stage's ``default_factory`` optimiser settings, when ``base`` is None)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown config key {full!r}{hint}; known keys under "
                f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}"
            )
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            f = known[key]
            if base is not None:
                child = getattr(base, key)
            elif f.default_factory is not dataclasses.MISSING:
                child = f.default_factory()
            else:
                child = None
            kwargs[key] = _build(hint_type, value or {}, full + ".", child)
        elif key == "overrides":
            kwargs[key] = dict(value or {})
        else:
            kwargs[key] = _check_value(full, value, hint_type)
    return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse value: {err}") from err
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return raw


def resolve_config_path(path: str | os.PathLike, stage: str) -> Path:
    """A path as given, or a name under the packaged configs/<stage>/ (``tiny_cpu`` -> tiny_cpu.yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_ROOT / stage / p, CONFIG_ROOT / stage / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config file not found: {path} (also looked in {CONFIG_ROOT / stage})")


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | None = None, stage: str = "classification"
) -> Any:
    config_class = stage_config_class(stage)
    raw: dict = {}
    if path is not None:
        p = resolve_config_path(path, stage)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    if raw.get("stage", stage) != stage:
        raise ConfigError(f"config is for stage {raw['stage']!r}, not {stage!r}")
    cfg = _build(config_class, raw, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
