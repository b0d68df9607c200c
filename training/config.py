"""Run configuration: a YAML file (which may name a ``base:`` file it extends) plus ``dotted.key=value``
overrides, checked into dataclasses.

Every run config has the same layout: ``stage``, ``model`` (with ``model.vision``: a
:class:`VisionTowerConfig`), ``data``, ``[augment]``, ``optim``, ``train``. Every item of the paper's
recipe (PAPER.md §3) is a field here or in a stage's module, so a run or an ablation is a config file,
never a code edit. Unknown keys, wrongly typed values, values outside a field's declared range and keys
of the old layout are refused with one clear message naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from defocus_vlm.data.classification import FASHION_MNIST_DIR
from defocus_vlm.overrides import parse_assignment

from .fields import ConfigError, check_fields, choice, free, num  # ConfigError: callers import it from here

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
PRECISIONS = ("auto", "bf16", "fp32")
ON_CORRUPT = ("skip", "fail")


@dataclass
class VisionTowerConfig:
    """The image encoder of every stage.

    source: a preset name (``defocus-vlm presets``; randomly initialised) or a directory with a De-focus
        export whose encoder starts the run: a vision model or classifier (stage 1), a CLIP model
        (stage 2) or a VLM (stage 3).
    overrides: DefocusVisionConfig fields to change (patch_size, embed_dim, depth, decay, rope, ...); a
        stage sets the fields that come from its data itself (img_size and in_chans in classification and
        CLIP). On a directory, fields that change a weight's shape cannot load its weights."""

    source: str = "defocus_mamba_tiny"
    freeze: bool = False  # keep the encoder's weights fixed (the head / projection / projector still trains)
    overrides: dict = field(default_factory=dict)


@dataclass
class ImageDataConfig:
    """Image decoding, preprocessing and limits shared by the data sections of every image stage."""

    img_size: int = num(224, ge=1)  # training / evaluation resolution
    in_chans: int = choice(3, 1, 3)  # 1 (grey) or 3 (RGB); images are converted to this
    crop_pct: float = num(0.875, gt=0, le=1)  # evaluation: resize to img_size / crop_pct, then centre-crop img_size
    mean: list | None = None  # normalisation mean per channel (null: ImageNet's, or 0.5 for grey)
    std: list | None = num(None, gt=0)  # normalisation std per channel (null: ImageNet's, or 0.5 for grey)
    interpolation: str = "bicubic"  # resize filter (bicubic, bilinear, ...)
    num_workers: int = num(0, ge=0, resume_free=True)  # DataLoader worker processes
    on_corrupt: str = choice("skip", *ON_CORRUPT,
                             resume_free=True)  # "skip" (replace with the next image, count it) | "fail"
    verify: int = num(64, ge=-1, resume_free=True)  # images decoded per split before training (-1 = all, 0 = none)
    limit_train: int = num(0, ge=0)  # use only the first N training samples (0 = all): tiny/debug runs
    limit_val: int = num(0, ge=0)  # use only the first N validation samples (0 = all)


@dataclass
class DataConfig(ImageDataConfig):
    """source: "fashion_mnist" (IDX files under ``path``), "imagefolder" (``path``/train/<class>/...),
    "hf" (a ``save_to_disk`` directory or a dataset loadable by ``datasets.load_dataset(path)``)
    or "auto" (decided from what ``path`` contains)."""

    source: str = choice("auto", "auto", "fashion_mnist", "imagefolder", "hf")
    path: str = FASHION_MNIST_DIR  # dataset location (see source)
    train_split: str = "train"  # split / folder name used for training
    val_split: str = "val"  # split / folder name used for validation
    image_column: str = "image"  # image column of a datasets dataset
    label_column: str = "label"  # label column of a datasets dataset


@dataclass
class AugmentConfig:
    """DeiT / paper recipe; all from timm. mixup/cutmix are the Beta alphas (0 = off)."""

    scale: list = num([0.08, 1.0], gt=0, le=1)  # RandomResizedCrop area range
    hflip: float = num(0.5, ge=0, le=1)  # horizontal flip probability
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec (null = off)
    color_jitter: float = num(0.4, ge=0)  # colour jitter strength (0 = off)
    random_erasing: float = num(0.25, ge=0, le=1)  # random erasing probability
    mixup: float = num(0.8, ge=0)  # mixup Beta alpha (0 = off)
    cutmix: float = num(1.0, ge=0)  # cutmix Beta alpha (0 = off)
    mixup_prob: float = num(1.0, ge=0, le=1)  # probability of applying mixup or cutmix to a batch
    mixup_switch_prob: float = num(0.5, ge=0, le=1)  # probability of cutmix instead of mixup when both are on
    label_smoothing: float = num(0.1, ge=0, lt=1)  # label smoothing of the (mixed) targets
    repeated_aug: int = num(3, ge=0)  # repeats per sample (timm RepeatAugSampler); 0 or 1 = off


@dataclass
class OptimConfig:
    """AdamW; the LR is ``lr * global_batch / lr_batch_ref``; warm-up then cosine, per iteration. No weight
    decay on 1-D tensors, biases and the parameters a module names in its ``no_weight_decay()``."""

    lr: float = num(5e-4, gt=0)  # base learning rate (per lr_batch_ref images when scale_lr)
    lr_batch_ref: int = num(512, ge=1)  # reference global batch of the LR scaling rule
    scale_lr: bool = True  # peak LR = lr * global batch / lr_batch_ref
    weight_decay: float = num(0.05, ge=0)  # AdamW weight decay
    betas: list = num([0.9, 0.999], ge=0, lt=1)  # AdamW betas
    eps: float = num(1e-8, gt=0)  # AdamW eps
    warmup_epochs: float = num(20.0, ge=0)  # linear warm-up length in epochs (fractions allowed), then cosine per step
    warmup_lr: float = num(5e-7, ge=0)  # LR at the first warm-up step
    min_lr: float = num(5e-6, ge=0)  # LR at the end of the cosine
    clip_grad: float = num(10.0, ge=0)  # gradient-norm clipping (0 = off)


@dataclass
class TrainConfig:
    epochs: int = num(300, ge=1)  # passes over the training data (with max_steps, whichever ends first)
    batch_size: int = num(512, ge=1)  # global: micro_batch_size * world_size * gradient accumulation
    micro_batch_size: int = num(0, ge=0, resume_free=True)  # per process; 0 = batch_size / world_size (no accumulation)
    max_steps: int = num(0, ge=0)  # stop after N optimiser steps (0 = epochs decide): fixed-budget runs
    stop_after: int = num(0, ge=0, resume_free=True)  # checkpoint and exit after global step N (time-sliced jobs)
    drop_path_min: float = num(0.1, ge=0, lt=1)  # drop-path rate of the first epoch
    drop_path_max: float = num(0.7, ge=0, lt=1)  # drop-path rate of the last epoch (the paper's rising schedule)
    drop_path_schedule: str = choice("linear", "linear", "constant")  # "linear" (rising per epoch) | "constant" (= max)
    ema_decay: float = num(0.9999, ge=0, lt=1)  # 0 = no EMA
    seed: int = num(0, ge=0)  # seed of the model init, the data order and every step's augmentation
    deepspeed: str = "zero2"  # a name in configs/deepspeed/ or a path to a JSON file
    precision: str = choice("auto", *PRECISIONS)  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    cpu_threads: int = num(0, ge=0, resume_free=True)  # torch intra-op threads (0 = torch's); 1 is fastest on busy CPUs
    checkpoint_every: int = num(0, ge=0, resume_free=True)  # optimiser steps between checkpoints (0 = at epoch ends)
    keep_checkpoints: int = num(2, ge=0, resume_free=True)  # checkpoints kept on disk, oldest removed (0 = all)
    eval_every: int = num(1, ge=0, resume_free=True)  # epochs between validation passes (0 = only at the end)
    eval_batch_size: int = num(256, ge=1, resume_free=True)  # batch size of the validation passes
    log_every: int = num(10, ge=1, resume_free=True)  # steps between log lines when the progress bar is off
    output_dir: str = free("runs/classification")  # run directory: config, checkpoints, logs, metrics, exported model
    tensorboard: bool = free(True)  # write TensorBoard scalars under output_dir/tensorboard
    progress: bool = free(True)  # show a progress bar (loss, LR, throughput, ETA)

    def rules(self) -> list[tuple[bool, str]]:
        return [(self.drop_path_min <= self.drop_path_max, "need train.drop_path_min <= train.drop_path_max")]


class RunConfig:
    """What every stage's run config (a dataclass with ``stage, model, data, [augment], optim, train``)
    shares: ``validate()`` checks every field against its declared range or options and every section's
    ``rules()`` (the run config's own: its cross-field checks). ``moved``: keys of the old layout ->
    their new key (a message naming it instead of 'unknown key')."""

    moved: ClassVar[dict[str, str]] = {}

    def validate(self) -> None:
        check_fields(self)

    def rules(self) -> list[tuple[bool, str]]:
        return []


# keys of the old layout that no stage reads any more (moved keys are in each run config's ``moved``)
REMOVED: dict[str, str] = {
    "optim.no_decay_names": "modules name the parameters that skip weight decay (their no_weight_decay())",
}


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
    try:
        return parse_assignment(text)
    except ValueError as err:
        raise ConfigError(f"override {err}") from err


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


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s keys: mappings merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if both else value
    return out


def _check_stage(raw: dict, stage: str, where: str = "config") -> None:
    if raw.get("stage", stage) != stage:
        raise ConfigError(f"{where} is for stage {raw['stage']!r}, not {stage!r}")


def _find_base(name: str, child: Path, stage: str) -> Path:
    """``base:`` of ``child``: a file relative to ``child``, or a packaged config name of the stage."""
    for folder in (child.parent, CONFIG_ROOT / stage):
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"{child}: base {name!r} not found (looked beside it and in {CONFIG_ROOT / stage})")


def read_config_file(path: str | os.PathLike, stage: str, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping a YAML file describes: the file named by its ``base:`` key, read the same way, with the
    file's own keys deep-merged on top. ``chain``: the files that inherit from this one (for cycles)."""
    path = Path(path).resolve()
    if path in chain:
        raise ConfigError("config files inherit in a cycle: " + " -> ".join(str(p) for p in (*chain, path)))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    _check_stage(raw, stage, str(path))
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name one file, got {base!r}")
    return deep_merge(read_config_file(_find_base(base, path, stage), stage, (*chain, path)), raw)


def _leaf_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        full = f"{prefix}{key}"
        keys += _leaf_keys(value, full + ".") if isinstance(value, dict) and value else [full]
    return keys


def refuse_old_keys(raw: dict, moved: dict[str, str]) -> None:
    """One line naming the new key for the first key of the old layout in ``raw`` (``moved``: old key ->
    new key; a key under an old section moves with it)."""
    for key in _leaf_keys(raw):
        for old, reason in REMOVED.items():
            if key == old or key.startswith(old + "."):
                raise ConfigError(f"config key {old!r} was removed: {reason}")
        old = max((o for o in moved if key == o or key.startswith(o + ".")), key=len, default=None)
        if old is not None:
            raise ConfigError(f"config key {key!r} is now {moved[old] + key[len(old):]!r}")


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | None = None, stage: str = "classification"
) -> Any:
    from . import get_stage

    config_class = get_stage(stage).config_class()
    raw = read_config_file(resolve_config_path(path, stage), stage) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    _check_stage(raw, stage)
    refuse_old_keys(raw, config_class.moved)
    cfg = _build(config_class, raw, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
