"""Stage 2: CLIP-style image-text alignment of a De-focus image tower with a text tower, on the
shared DeepSpeed loop (training/loop.py).

The towers (``model.vision``, ``model.text``): the image tower is a preset or an export's encoder; the
text tower is a pretrained Hugging Face model (MiniLM, SmolLM2, ...) or one built from a config and
trained from scratch.
The loss is InfoNCE or SigLIP over the *global* batch (features gathered across processes). With
gradient accumulation the step keeps every in-batch negative (GradCache): embeddings of all micro
batches are computed without a graph, the loss and its gradient w.r.t. the embeddings are taken
once, then every micro batch is recomputed with a graph and that gradient is pushed through it.

``run(cfg, resume=False)`` trains, checkpoints, evaluates (zero-shot top-1/top-5 on labelled
validation data, retrieval recall otherwise) and exports a CLIP directory (model + processor) with
the image tower beside it in ``image_tower/`` for stage 3."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from defocus_vlm.compat import enable_activation_checkpointing
from defocus_vlm.contrastive import LOSSES, contrastive_loss
from defocus_vlm.data.classification import ClassificationDataset, verify_source
from defocus_vlm.data.pairs import (
    PAIR_SOURCES,
    PairCollator,
    PairDataset,
    TemplatedPairs,
    check_templates,
    detect_pair_source,
    open_pairs,
)

from .config import (
    FASHION_MNIST_DIR,
    ConfigError,
    ImageDataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    VisionTowerConfig,
)
from .export import export_model
from .fields import choice, num
from .loop import StageTask, StepContext, reduce_count, run_stage
from .towers import is_export, load_encoder, tower_config

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedTokenizerBase

    from defocus_vlm.modeling_clip import DefocusCLIPModel


# --------------------------------------------------------------------------- run config
@dataclass
class TextTowerConfig:
    """``pretrained``: a Hugging Face text model directory or name, loaded offline (``gguf_file``
    for GGUF checkpoints such as SmolLM2's), with its own tokenizer; or ``config``: a dict with
    ``model_type`` (e.g. a small ``llama``) for a tower trained from scratch, its vocabulary sized
    from ``tokenizer`` ("byte": the built-in byte-level tokenizer, or a tokenizer directory)."""

    pretrained: str | None = None  # a Hugging Face text model (MiniLM, SmolLM2, ...) to start from
    gguf_file: str | None = None  # GGUF file name inside ``pretrained`` (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)
    config: dict = field(default_factory=dict)  # from scratch: model_type and sizes (vocab/pad ids: tokenizer)
    tokenizer: str | None = None  # "byte" or a tokenizer directory (null: the pretrained model's own)
    pooling: str = choice("auto", "auto", "last", "mean", "first")  # auto: last for causal LMs, mean for encoders
    max_length: int = num(32, ge=1)  # captions and prompts are truncated to this many tokens
    freeze: bool = False  # keep the tower's weights fixed (its projection still trains)


@dataclass
class ClipModelConfig:
    vision: VisionTowerConfig = field(default_factory=lambda: VisionTowerConfig(source="defocus_vit_tiny"))
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    projection_dim: int = num(256, ge=1)  # width of the shared image-text embedding
    loss: str = choice("clip", *LOSSES)  # "clip" (InfoNCE) | "siglip" (pairwise sigmoid with a learnable bias)
    logit_scale_init: float | None = None  # default: log(1/0.07) (clip) or log(10) (siglip)
    logit_bias_init: float | None = None  # default: none (clip) or -10 (siglip)
    gradient_checkpointing: bool = False  # recompute the towers' activations in backward (text: if supported)


@dataclass
class PairDataConfig(ImageDataConfig):
    """source: auto | csv | jsonl | hf | webdataset | fashion_mnist | easy_vqa | labelled (an image
    folder / HF classification dataset captioned with ``templates``). File sources are one split
    each: ``path`` trains and ``val_path`` (optional) validates."""

    source: str = choice("auto", *PAIR_SOURCES)
    path: str = FASHION_MNIST_DIR  # pairs location (see source; "easy_vqa" for the built-in set)
    val_path: str | None = None  # file sources: the validation pairs (null: no validation)
    train_split: str = "train"  # split used for training (built-in and datasets sources)
    val_split: str = "val"  # split used for validation (built-in and datasets sources)
    image_column: str = "image"  # image column / key of a table or datasets dataset
    caption_column: str = "caption"  # caption column / key of a table or datasets dataset
    templates: list | None = None  # caption templates of labelled sources ("a photo of a {}."); null = built-in

    def rules(self) -> list[tuple[bool, str]]:
        try:
            if self.templates is not None:
                check_templates(self.templates, "data.templates")
        except ValueError as err:
            return [(False, str(err))]
        return []


@dataclass
class PairAugmentConfig:
    """Image augmentation (timm). Colour changes are off by default: captions may name colours."""

    scale: list = num([0.9, 1.0], gt=0, le=1)  # RandomResizedCrop area range
    hflip: float = num(0.0, ge=0, le=1)  # horizontal flip probability
    rand_augment: str | None = None  # timm RandAugment spec (e.g. rand-m9-mstd0.5-inc1); null = off
    color_jitter: float = num(0.0, ge=0)  # colour jitter strength (0 = off)
    random_erasing: float = num(0.0, ge=0, le=1)  # random erasing probability


@dataclass
class ClipRunConfig(RunConfig):
    stage: str = "clip"  # the stage this file configures (checked against the command)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    augment: PairAugmentConfig = field(default_factory=PairAugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # the configs set open_clip's recipe (see configs/clip)
    train: TrainConfig = field(default_factory=TrainConfig)

    moved: ClassVar[dict[str, str]] = {
        "vision": "model.vision", "vision.preset": "model.vision.source", "vision.init_from": "model.vision.source",
        "vision.patch_size": "model.vision.overrides.patch_size", "vision.lock": "model.vision.freeze",
        "vision.gradient_checkpointing": "model.gradient_checkpointing", "text": "model.text",
        "text.lock": "model.text.freeze", "text.gradient_checkpointing": "model.gradient_checkpointing"}

    def rules(self) -> list[tuple[bool, str]]:
        x = self.model.text
        return [
            (self.train.batch_size >= 2, "train.batch_size must be at least 2 (contrastive losses need negatives)"),
            (bool(x.pretrained) != bool(x.config),
             "give exactly one of model.text.pretrained (a Hugging Face text model) and model.text.config (a "
             "model_type and sizes, trained from scratch)"),
            (bool(x.pretrained) or bool(x.tokenizer),
             "model.text.config needs model.text.tokenizer ('byte' or a tokenizer path)"),
            (not (self.model.vision.freeze and x.freeze),
             "model.vision.freeze and model.text.freeze are both set: nothing but the projections would train"),
        ]


# --------------------------------------------------------------------------- building blocks
def build_tokenizer(text: TextTowerConfig) -> PreTrainedTokenizerBase:
    from defocus_vlm.processing_clip import byte_level_tokenizer

    name = text.tokenizer or text.pretrained
    if name == "byte":
        return byte_level_tokenizer(text.max_length)
    from transformers import AutoTokenizer

    gguf = text.gguf_file if name == text.pretrained else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the tokenizer from {name!r}: {err}") from err
    if tokenizer.pad_token is None:  # causal LM tokenizers often have none; pooling reads the mask anyway
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = text.max_length
    return tokenizer


def _text_tower(text: TextTowerConfig, tokenizer):
    """(config, model or None): a pretrained model, or a config sized for the tokenizer."""
    if text.pretrained:
        from transformers import AutoModel

        kwargs = {"gguf_file": text.gguf_file} if text.gguf_file else {}
        try:
            model = AutoModel.from_pretrained(text.pretrained, dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the text model {text.pretrained!r}: {err}") from err
        return model.config, model
    values = dict(text.config)
    if values.get("vocab_size", len(tokenizer)) < len(tokenizer):
        raise ConfigError(f"text.config.vocab_size {values['vocab_size']} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens")
    values.setdefault("vocab_size", len(tokenizer))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        values.setdefault(key, getattr(tokenizer, key))
    return values, None


def _vision_tower(cfg: ClipRunConfig):
    """(config, model or None): an export's encoder, or a preset sized for the data."""
    v, d = cfg.model.vision, cfg.data
    if not is_export(v):
        return tower_config(v, img_size=d.img_size, in_chans=d.in_chans, num_labels=0, aux_loss="none"), None
    model = load_encoder(v)
    if model.config.in_chans != d.in_chans:
        raise ConfigError(f"model.vision.source {v.source} reads {model.config.in_chans}-channel images but "
                          f"data.in_chans is {d.in_chans}")
    return model.config, model


def build_clip_model(cfg: ClipRunConfig, tokenizer: PreTrainedTokenizerBase) -> DefocusCLIPModel:
    from defocus_vlm import DefocusCLIPConfig, DefocusCLIPModel

    vision_config, vision_model = _vision_tower(cfg)
    m = cfg.model
    text_config, text_model = _text_tower(m.text, tokenizer)
    try:
        config = DefocusCLIPConfig(
            vision_config=vision_config, text_config=text_config, projection_dim=m.projection_dim,
            text_pooling=m.text.pooling, loss_type=m.loss, logit_scale_init_value=m.logit_scale_init,
            logit_bias_init_value=m.logit_bias_init)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"CLIP model config: {err}") from err
    model = DefocusCLIPModel(config, vision_model=vision_model, text_model=text_model)
    if m.gradient_checkpointing:
        enable_activation_checkpointing(model.vision_model)
        if model.text_model.supports_gradient_checkpointing:
            enable_activation_checkpointing(model.text_model)
    if m.vision.freeze:
        model.lock_image_tower()
    if m.text.freeze:
        model.lock_text_tower()
    return model


# --------------------------------------------------------------------------- the stage
class ClipTask(StageTask):
    name = "clip"

    def build_data(self) -> PairDataset:
        from .augment import AugmentConfig, EvalTransform, TrainTransform

        cfg, d = self.cfg, self.cfg.data
        self.tokenizer = build_tokenizer(cfg.model.text)
        self.collator = PairCollator(self.tokenizer, cfg.model.text.max_length)
        train_src = open_pairs(d.source, d.path, d.train_split, d.image_column, d.caption_column, d.templates)
        val_src = self._open_val()
        if d.verify:
            verify_source(train_src, d.verify, "train", d.on_corrupt, d.limit_train)
            if val_src is not None:
                verify_source(val_src, d.verify, "val", d.on_corrupt, d.limit_val)
        self.val_pairs = val_src
        # labelled validation data is scored zero-shot (class-name prompts), anything else by retrieval
        self.zeroshot = isinstance(val_src, TemplatedPairs) and val_src.names is not None
        self.curve_metric = "top1" if self.zeroshot else "i2t_r1" if val_src is not None else None
        if val_src is not None:
            labelled = val_src.source if self.zeroshot else val_src
            dataset_class = ClassificationDataset if self.zeroshot else PairDataset
            self.val_ds = dataset_class(labelled, EvalTransform(d), d.on_corrupt, d.limit_val)
        a = cfg.augment
        augment = AugmentConfig(scale=a.scale, hflip=a.hflip, rand_augment=a.rand_augment, color_jitter=a.color_jitter,
                                random_erasing=a.random_erasing, mixup=0.0, cutmix=0.0, repeated_aug=0)
        self.counters.setdefault("skipped_images", 0)
        return PairDataset(train_src, TrainTransform(d, augment), d.on_corrupt, d.limit_train)

    def _open_val(self):
        d = self.cfg.data
        kind = d.source if d.source != "auto" else detect_pair_source(d.path)
        if kind in ("csv", "jsonl", "webdataset") and not d.val_path:
            return None  # one file is one split: validate only when data.val_path is given
        path = d.val_path or d.path
        return open_pairs(d.source, path, d.val_split, d.image_column, d.caption_column, d.templates,
                          sample_templates=False)

    def collate_fn(self) -> PairCollator:
        return self.collator

    def build_model(self) -> torch.nn.Module:
        self.model = build_clip_model(self.cfg, self.tokenizer)
        return self.model

    def describe(self, model: torch.nn.Module) -> str:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        val = f"{len(self.val_ds)} val {'images (zero-shot)' if self.zeroshot else 'pairs'}" \
            if self.val_pairs is not None else "no validation"
        total = sum(p.numel() for p in model.parameters())
        return (f"clip ({self.cfg.model.loss}): image tower {model.config.vision_config.preset or 'custom'}, "
                f"text tower {model.config.text_config.model_type} | {total / 1e6:.2f}M params, "
                f"{trainable / 1e6:.2f}M trained | {val}")

    # ---- one optimiser step
    @staticmethod
    def _inputs(batch: dict, ctx: StepContext) -> dict:
        return {"pixel_values": batch["pixel_values"].to(ctx.device, ctx.dtype),
                "input_ids": batch["input_ids"].to(ctx.device),
                "attention_mask": batch["attention_mask"].to(ctx.device),
                "drop_path_rate": ctx.drop_path}

    def _loss(self, image_embeds, text_embeds, scale, bias) -> torch.Tensor:
        return contrastive_loss(self.cfg.model.loss, image_embeds, text_embeds, scale, bias)

    def micro_loss(self, engine: DeepSpeedEngine, batch: dict, ctx: StepContext) -> torch.Tensor:
        out = engine(**self._inputs(batch, ctx))
        return self._loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)

    def train_step(self, engine: DeepSpeedEngine, batches: list, ctx: StepContext) -> float:
        self.counters["skipped_images"] += reduce_count(sum(b["skipped"] for b in batches))
        if len(batches) == 1:
            return super().train_step(engine, batches, ctx)
        return self._cached_step(engine, batches, ctx)

    def _cached_step(self, engine, batches: list, ctx: StepContext) -> float:
        """Gradient accumulation that keeps every negative of the step's batch (GradCache)."""
        with torch.no_grad():
            outs = []
            for m, batch in enumerate(batches):
                ctx.seed_micro(m)  # the same drop-path masks as the recomputation below
                outs.append(engine(**self._inputs(batch, ctx)))
        images = torch.cat([o.image_embeds for o in outs]).requires_grad_()
        texts = torch.cat([o.text_embeds for o in outs]).requires_grad_()
        scale = outs[0].logit_scale.detach().requires_grad_()
        bias = outs[0].logit_bias.detach().requires_grad_() if outs[0].logit_bias is not None else None
        loss = self._loss(images, texts, scale, bias)
        loss.backward()  # d loss / d embeddings, through the gather across processes
        sizes = [len(o.image_embeds) for o in outs]
        image_grads, text_grads = images.grad.split(sizes), texts.grad.split(sizes)
        for m, batch in enumerate(batches):
            ctx.seed_micro(m)
            out = engine(**self._inputs(batch, ctx))
            surrogate = (out.image_embeds * image_grads[m]).sum() + (out.text_embeds * text_grads[m]).sum()
            if m == 0:  # the temperature (and bias) enter the loss once per step
                surrogate = surrogate + (out.logit_scale * scale.grad).sum()
                if bias is not None:
                    surrogate = surrogate + (out.logit_bias * bias.grad).sum()
            engine.backward(surrogate * len(batches))  # engine.backward divides by the accumulation steps
            engine.step()
        return float(loss.detach())

    # ---- evaluation and export
    def evaluate(self, model: torch.nn.Module, ctx: StepContext) -> dict:
        """Every process scores the whole validation set (retrieval needs all of it in one place)."""
        if self.val_pairs is None:
            return {}
        t = self.cfg.train
        if self.zeroshot:
            from defocus_vlm.eval.zeroshot import evaluate_zeroshot

            return evaluate_zeroshot(model, self.tokenizer, self.val_ds, self.val_pairs.names,
                                     self.val_pairs.templates, ctx.device, ctx.dtype, t.eval_batch_size,
                                     self.num_workers())
        from defocus_vlm.eval.retrieval import evaluate_retrieval

        return evaluate_retrieval(model, self.val_ds, self.tokenizer, self.cfg.model.text.max_length, ctx.device,
                                  ctx.dtype, t.eval_batch_size, self.num_workers())

    def summary_line(self, metrics: dict) -> str:
        key = "top1" if self.zeroshot else "i2t_r1"
        label = "zero-shot top-1" if self.zeroshot else "image->text R@1"
        text = f"val {label} {metrics['raw'][key]:.2f}"
        return text + (f" (EMA {metrics['ema'][key]:.2f})" if "ema" in metrics else "")

    def export(self, state: dict, out_dir: Path) -> None:
        """The CLIP model and its processor, and the image tower in image_tower/ (a DefocusVisionModel
        directory for stage 3)."""
        from defocus_vlm import DefocusCLIPModel, DefocusCLIPProcessor

        from .augment import image_processor

        model = DefocusCLIPModel(self.model.config)
        processor = DefocusCLIPProcessor(image_processor(self.cfg.data), self.tokenizer)
        export_model(model, state, processor, out_dir)
        model.save_image_tower(out_dir / "image_tower", processor.image_processor)


def run(cfg: ClipRunConfig, resume: bool = False) -> dict:
    return run_stage(ClipTask(cfg), cfg, resume)
