"""Stage 3: LLaVA-style instruction tuning of the VLM on the shared DeepSpeed loop (training/loop.py).

``model.tune: projector`` trains the projector alone (encoder and language model frozen; LLaVA's
pre-training stage); ``model.tune: finetune`` trains the projector and the language model, fully or
with LoRA (``model.lora.r > 0``), and the encoder too when ``model.vision.freeze`` is false. The model
is built from a vision tower (a preset, a stage-1 export or an extracted CLIP image tower), a
language model (a path/name/alias for :func:`defocus_vlm.llm.load_llm`, or a config for a randomly
initialised one) and a projector; or it starts from an existing VLM directory (``model.init_from``).

The loss is the model's own ``forward(labels=...)``, which runs the language model's head only at the
positions that predict a trained token, not on every image and prompt token. The processor is built
first, from the model's config (:func:`defocus_vlm.build.vlm_config`): it encodes the conversations
and is exported with the model, which ``build_model`` builds from that same config. Evaluation is
greedy exact match on the held-out conversations (their last assistant turn) plus the teacher-forced
loss. ``run(cfg, resume=False)`` returns the summary (with per-step losses)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from defocus_vlm import compat
from defocus_vlm.configuration_vlm import FEATURE_SELECTS, PROJECTOR_TYPES
from defocus_vlm.constants import IMAGE_TOKEN
from defocus_vlm.data.classification import verify_source
from defocus_vlm.data.llava import (
    IGNORE_INDEX,
    OVERLONG_POLICIES,
    ConversationEncoder,
    LlavaCollator,
    LlavaDataset,
    read_llava_json,
    resolve_images,
)

from .config import ON_CORRUPT, ConfigError, OptimConfig, RunConfig, TrainConfig, VisionTowerConfig
from .engine import all_reduce_sum
from .export import export_model
from .fields import choice, num
from .loop import StageTask, StepContext, run_stage
from .towers import is_export, load_encoder, tower_config

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from defocus_vlm.configuration_defocus import DefocusVisionConfig
    from defocus_vlm.modeling_defocus import DefocusVisionModel
    from defocus_vlm.modeling_vlm import DefocusVLMForConditionalGeneration
    from defocus_vlm.processing_vlm import DefocusVLMProcessor

TUNE_MODES = ("projector", "finetune")
CHAR_TOKENIZER = "char"
WORD_TOKENIZER = "words"


@dataclass
class LanguageModelConfig:
    """name: a causal LM for ``load_llm`` (a directory, a cached hub name or ``smollm2-135m-instruct``).
    config: instead of ``name``, a transformers config dict with ``model_type`` for a randomly
    initialised LM (vocabulary size and special token ids come from the tokenizer).
    tokenizer: defaults to ``name``'s; with ``config`` give a path/name/alias, ``char`` (the built-in
    character tokenizer) or ``words`` (a word-level vocabulary of the training conversations: one token
    per word wherever it stands, for a small closed-domain LM trained from scratch)."""

    name: str | None = None
    config: dict = field(default_factory=dict)
    tokenizer: str | None = None


@dataclass
class LoraSettings:
    """LoRA on the language model (peft); r = 0 trains it fully."""

    r: int = num(0, ge=0)  # LoRA rank (0 = train the language model fully)
    alpha: float = num(16.0, gt=0)  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = num(0.05, ge=0, lt=1)  # dropout on the LoRA input
    target_modules: list = field(  # module names that get LoRA adapters
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class InstructModelConfig:
    tune: str = choice("finetune", *TUNE_MODES)  # "projector" | "finetune"
    init_from: str | None = None  # an existing VLM directory (vision / llm / projector settings are then ignored)
    vision: VisionTowerConfig = field(default_factory=lambda: VisionTowerConfig(freeze=True))
    llm: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    projector_type: str = choice("mlp2x_gelu", *PROJECTOR_TYPES)  # "mlp2x_gelu" (LLaVA-1.5) or "linear"
    vision_feature_select: str = choice("all", *FEATURE_SELECTS)  # "all" (patches + class token) / "patches" / "cls"
    vision_feature_layer: int = -1  # encoder block whose output feeds the projector (-1 = last)
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False  # recompute activations of the encoder and the LLM in backward


@dataclass
class InstructDataConfig:
    """LLaVA JSON conversations; image paths are relative to ``image_folder`` (default: the ``images``
    folder next to ``train_json``). ``overlong``: what happens to samples longer than ``max_length``
    tokens (image tokens included): truncate (text only; samples whose image tokens would be cut are
    dropped), drop or error."""

    train_json: str = ""  # LLaVA JSON conversations to train on
    eval_json: str = ""  # LLaVA JSON with reference answers, scored (exact match) after training
    image_folder: str = ""  # folder the image paths are relative to (default: images/ beside train_json)
    max_length: int = num(2048, ge=1)  # longest sample in tokens, image tokens included
    overlong: str = choice("truncate", *OVERLONG_POLICIES)  # samples longer than max_length: truncate / drop / error
    crop_pct: float = num(1.0, gt=0, le=1)  # whole images by default (LLaVA does not crop)
    hflip: float = num(0.0, ge=0, le=1)  # probability of mirroring a training image left-right (only if answers allow)
    vflip: float = num(0.0, ge=0, le=1)  # probability of flipping a training image upside down (only if answers allow)
    chat_template: str | None = None  # a Jinja template (its text or a file); default: the processor's
    limit_train: int = num(0, ge=0)  # first N conversations only (0 = all)
    limit_eval: int = num(0, ge=0)  # score only the first N evaluation questions (0 = all)
    max_new_tokens: int = num(16, ge=1)  # generation length when scoring
    num_workers: int = num(0, ge=0, resume_free=True)  # DataLoader worker processes
    on_corrupt: str = choice("skip", *ON_CORRUPT, resume_free=True)  # unreadable image: "skip" the sample | "fail"
    verify: int = num(64, ge=-1, resume_free=True)  # samples whose images are decoded before training (-1 = all)


def _instruct_optim() -> OptimConfig:
    return OptimConfig(lr=2e-5, scale_lr=False, weight_decay=0.0, warmup_epochs=0.03, warmup_lr=0.0, min_lr=0.0,
                       clip_grad=1.0)


def _instruct_train() -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=128, drop_path_min=0.0, drop_path_max=0.0, ema_decay=0.0,
                       eval_batch_size=64, output_dir="runs/instruct")


@dataclass
class InstructRunConfig(RunConfig):
    stage: str = "instruct"  # the stage this file configures (checked against the command)
    model: InstructModelConfig = field(default_factory=InstructModelConfig)
    data: InstructDataConfig = field(default_factory=InstructDataConfig)
    optim: OptimConfig = field(default_factory=_instruct_optim)
    train: TrainConfig = field(default_factory=_instruct_train)

    moved: ClassVar[dict[str, str]] = {"model.vision.img_size": "model.vision.overrides.img_size",
                                       "model.vision.patch_size": "model.vision.overrides.patch_size"}

    def rules(self) -> list[tuple[bool, str]]:
        m, t = self.model, self.train
        return [
            (m.lora.r == 0 or m.tune == "finetune", "model.lora needs model.tune: finetune (projector mode trains "
                                                    "the projector only)"),
            (m.lora.r == 0 or bool(m.lora.target_modules), "model.lora.target_modules is empty"),
            (bool(m.init_from) or bool(m.llm.name) != bool(m.llm.config),
             "give exactly one of model.llm.name and model.llm.config (or model.init_from)"),
            (bool(m.init_from) or bool(m.llm.name) or bool(m.llm.tokenizer),
             "model.llm.config needs model.llm.tokenizer (a path/name, or 'char')"),
            (bool(self.data.train_json), "data.train_json is required (a LLaVA JSON file)"),
            (t.ema_decay == 0, "train.ema_decay must be 0 for instruction tuning (no EMA of a language model)"),
            (t.drop_path_max == 0, "train.drop_path_min/max must be 0: the encoder's drop path is not used here"),
        ]


# --------------------------------------------------------------------------- model parts
def read_chat_template(value: str) -> str:
    """A Jinja chat template given as its text or as a file path."""
    if "{" in value:
        return value
    if not Path(value).is_file():
        raise FileNotFoundError(f"data.chat_template: {value!r} is neither a Jinja template nor a file")
    return Path(value).read_text()


def load_tokenizer(spec: str, train_json: str | None = None) -> PreTrainedTokenizerBase:
    """``spec`` as in :class:`LanguageModelConfig`; ``words`` reads its vocabulary from ``train_json``."""
    from defocus_vlm.llm import build_char_tokenizer, build_word_tokenizer, load_tokenizer

    if spec == CHAR_TOKENIZER:
        return build_char_tokenizer()
    if spec == WORD_TOKENIZER:
        if not train_json:
            raise ConfigError("model.llm.tokenizer: words builds its vocabulary from data.train_json; set it")
        texts = [m["content"].replace(IMAGE_TOKEN, " ") for c in read_llava_json(train_json) for m in c.messages]
        return build_word_tokenizer(["system user assistant", *texts])
    return load_tokenizer(spec)


def vision_tower(v: VisionTowerConfig) -> DefocusVisionModel | DefocusVisionConfig:
    """A DefocusVisionModel (an export's encoder) or a DefocusVisionConfig (a preset)."""
    return load_encoder(v) if is_export(v) else tower_config(v, num_labels=0)


def saved_normalisation(source: str) -> tuple[list | None, list | None]:
    """(image_mean, image_std) an encoder directory was trained with (its image processor config,
    or a VLM's processor config); (None, None) for presets: the processor's defaults."""
    import json

    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = Path(source) / name
        if path.is_file():
            saved = json.loads(path.read_text())
            saved = saved.get(key, {}) if key else saved
            if "image_mean" in saved:
                return saved["image_mean"], saved.get("image_std")
    return None, None


def random_language_config(config: dict, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The config of a randomly initialised causal LM from a config dict, its vocabulary and special tokens
    the tokenizer's."""
    from transformers import AutoConfig

    values = dict(config)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ConfigError("model.llm.config needs a model_type (e.g. llama)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    values.update(vocab_size=len(tokenizer), pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model.llm.config: {err}") from err


def random_language_model(text_config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised causal LM of ``text_config``."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(copy.deepcopy(text_config))
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model.llm.config: {err}") from err


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant, so frozen inputs need no grad)."""
    compat.enable_activation_checkpointing(model, {"use_reentrant": False})


# --------------------------------------------------------------------------- the task
class InstructTask(StageTask):
    name = "instruct"
    curve_metric = "exact_match"

    # ---- the parts data and model share, built on first use (build_data and build_model may run in either order)
    @cached_property
    def vision(self) -> DefocusVisionModel | DefocusVisionConfig | None:
        """The vision tower: a DefocusVisionModel (an export's encoder), a DefocusVisionConfig (a preset), or None
        when the model starts from ``model.init_from``."""
        return None if self.cfg.model.init_from else vision_tower(self.cfg.model.vision)

    @cached_property
    def processor(self) -> DefocusVLMProcessor:
        """The processor the data is encoded with and the model is exported with. Its config is the model's:
        ``build_model`` builds the model of ``processor.vlm_config`` (or loads ``model.init_from``, whose saved
        config the processor read)."""
        from defocus_vlm import DefocusImageProcessor
        from defocus_vlm.build import vlm_config
        from defocus_vlm.llm import load_llm_config
        from defocus_vlm.processing_vlm import DefocusVLMProcessor

        m, d = self.cfg.model, self.cfg.data
        if m.init_from:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(m.init_from)
        else:
            vision_config = getattr(self.vision, "config", self.vision)
            tokenizer = load_tokenizer(m.llm.tokenizer or m.llm.name, d.train_json)
            text_config = load_llm_config(m.llm.name) if m.llm.name else random_language_config(m.llm.config,
                                                                                                 tokenizer)
            config = vlm_config(vision_config, text_config, tokenizer, projector_type=m.projector_type,
                                vision_feature_select=m.vision_feature_select,
                                vision_feature_layer=m.vision_feature_layer)
            mean, std = saved_normalisation(m.vision.source)
            image_processor = DefocusImageProcessor(size=vision_config.img_size, crop_pct=d.crop_pct, image_mean=mean,
                                                    image_std=std, num_channels=vision_config.in_chans)
            processor = DefocusVLMProcessor.from_config(config, tokenizer, image_processor)
        if d.chat_template:  # it becomes the model's template: the exported processor carries it
            processor.chat_template = read_chat_template(d.chat_template)
        return processor

    # ---- data
    def build_data(self) -> LlavaDataset:
        d = self.cfg.data
        self.encoder = ConversationEncoder(self.processor, d.max_length, d.overlong)
        image_folder = Path(d.image_folder) if d.image_folder else Path(d.train_json).parent / "images"
        train = self._read(d.train_json, image_folder, d.limit_train)
        samples = [s for s in (self.encoder.encode(c) for c in train) if s is not None]
        self.dropped_train = dict(self.encoder.dropped)
        self.eval_ds, self.eval_prompts = None, []
        if d.eval_json:
            conversations = self._read(d.eval_json, image_folder, d.limit_eval)
            self.encoder.dropped.clear()
            encoded = [self.encoder.encode(c) for c in conversations]
            kept = [(c, s) for c, s in zip(conversations, encoded) if s is not None]
            self.eval_ds = LlavaDataset([s for _, s in kept], image_folder, self.processor.image_processor)
            self.eval_prompts = [self._prompt(c) for c, _ in kept]
        self.num_train = len(samples)
        train_ds = LlavaDataset(samples, image_folder, self.processor.image_processor, d.hflip, d.vflip, d.on_corrupt)
        if d.verify:  # evaluation cannot skip a question: its images are all checked, and must all be readable
            verify_source(train_ds, d.verify, "train", d.on_corrupt)
            if self.eval_ds is not None:
                verify_source(self.eval_ds, -1, "eval", "fail")
        return train_ds

    def _read(self, path: str, image_folder: Path, limit: int) -> list:
        conversations = read_llava_json(path, self.processor.image_token)
        conversations = conversations[:limit] if limit else conversations
        resolve_images(conversations, image_folder, path)
        return conversations

    def _prompt(self, conversation) -> dict:
        """The prompt up to the last assistant turn (ids with image tokens), its images and the answer."""
        last = max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
        history = conversation.messages[:last]
        shown = sum(m["content"].count(self.processor.image_token) for m in history)
        return {"input_ids": torch.from_numpy(self.encoder.encode_prompt(history)),
                "images": conversation.images[:shown], "answer": conversation.messages[last]["content"]}

    def collate_fn(self) -> LlavaCollator:
        return LlavaCollator(self.processor.tokenizer.pad_token_id)

    # ---- model
    def build_model(self) -> torch.nn.Module:
        from defocus_vlm.build import assemble_vlm, load_vision
        from defocus_vlm.llm import load_llm
        from defocus_vlm.modeling_vlm import DefocusVLMForConditionalGeneration

        m = self.cfg.model
        if m.init_from:
            model = DefocusVLMForConditionalGeneration.from_pretrained(m.init_from, dtype=torch.float32)
            if model.config.image_token_id != self.processor.image_token_id:
                raise ConfigError(f"{m.init_from}: the model's image_token_id {model.config.image_token_id} is not "
                                  f"the processor's {self.processor.image_token} id {self.processor.image_token_id}")
        else:
            config = self.processor.vlm_config
            llm = load_llm(m.llm.name) if m.llm.name else random_language_model(config.text_config)
            model = assemble_vlm(config, self.processor.tokenizer, llm, load_vision(self.vision)[1])
        self.model_config, self.generation_config = model.config, copy.deepcopy(model.generation_config)
        train_vision = m.tune == "finetune" and not m.vision.freeze
        model.requires_grad_(False)
        model.multi_modal_projector.requires_grad_(True)
        model.vision_tower.requires_grad_(train_vision)
        if m.tune == "finetune" and m.lora.r == 0:
            model.language_model.requires_grad_(True)
        if m.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if m.lora.r:
            from .lora import apply_lora

            trainable = [model.multi_modal_projector] + ([model.vision_tower] if train_vision else [])
            model = apply_lora(model, m.lora.r, m.lora.alpha, m.lora.dropout, list(m.lora.target_modules), trainable)
            self.peft_model = model
        return model

    def describe(self, model: torch.nn.Module) -> str:
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        m = self.cfg.model
        mode = m.tune + (f" + LoRA r={m.lora.r}" if m.lora.r else "")
        dropped = f", dropped {self.dropped_train}" if self.dropped_train else ""
        evals = f", {len(self.eval_prompts)} eval" if self.eval_prompts else ""
        return (f"instruct ({mode}): {total / 1e6:.2f}M params, {trained / 1e6:.2f}M trained | "
                f"{self.processor.num_image_tokens()} tokens per image | "
                f"{self.num_train} train conversations{dropped}{evals}")

    # ---- one step
    def micro_loss(self, engine: DeepSpeedEngine, batch: dict, ctx: StepContext) -> torch.Tensor:
        return engine(**self._inputs(batch, ctx), labels=batch["labels"].to(ctx.device)).loss

    @staticmethod
    def _inputs(batch: dict, ctx: StepContext) -> dict:
        pixels = batch["pixel_values"]
        return {"input_ids": batch["input_ids"].to(ctx.device),
                "attention_mask": batch["attention_mask"].to(ctx.device),
                "pixel_values": pixels.to(ctx.device, ctx.dtype) if pixels is not None else None}

    # ---- evaluation
    def evaluate(self, model: torch.nn.Module, ctx: StepContext) -> dict:
        if self.eval_ds is None:
            return {}
        was_training = model.training
        model.eval()
        # ZeRO-3 needs every process in every forward: then each evaluates everything (same answers).
        sharded = not any(hasattr(p, "ds_id") for p in model.parameters())
        indices = range(ctx.rank, len(self.eval_ds), ctx.world) if sharded else range(len(self.eval_ds))
        size = self.cfg.train.eval_batch_size
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, trained tokens, correct, answered
        with torch.no_grad():
            for start in range(0, len(indices), size):
                chunk = list(indices[start:start + size])
                totals += self._eval_batch(model, chunk, ctx, synced=not sharded)
        if sharded:
            totals = all_reduce_sum(totals)
        model.train(was_training)
        loss_sum, tokens, correct, answered = totals.tolist()
        return {"exact_match": round(100.0 * correct / answered, 4), "loss": round(loss_sum / tokens, 6),
                "samples": int(answered)}

    def _eval_batch(self, model, chunk: list[int], ctx: StepContext, synced: bool) -> torch.Tensor:
        from defocus_vlm.eval.vqa_metrics import exact_match

        batch = self.collate_fn()([self.eval_ds[i] for i in chunk])
        labels = batch["labels"].to(ctx.device)
        # num_items_in_batch=1: the loss summed over the trained tokens (transformers divides the sum by it)
        loss_sum = model(**self._inputs(batch, ctx), labels=labels, num_items_in_batch=1).loss
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        answers = self.generate(model, [self.eval_prompts[i] for i in chunk], ctx, synced)
        correct = sum(exact_match(a, self.eval_prompts[i]["answer"]) for a, i in zip(answers, chunk))
        return torch.tensor([float(loss_sum), tokens, correct, len(chunk)], dtype=torch.float64)

    def generate(self, model: DefocusVLMForConditionalGeneration | PeftModel, prompts: list[dict], ctx: StepContext,
                 synced: bool = False) -> list[str]:
        """Greedy answers to left-padded prompts (``_prompt`` items). synced: every process runs every
        decoding step (ZeRO-3, where each forward needs all processes)."""
        tokenizer = self.processor.tokenizer
        batch = LlavaCollator(tokenizer.pad_token_id, padding_side="left")(
            [{"input_ids": p["input_ids"], "pixel_values": self.eval_ds.load_images(p["images"])} for p in prompts])
        inputs = self._inputs(batch, ctx)
        ids = inputs["input_ids"]
        out = model.generate(**inputs, do_sample=False,
                             max_new_tokens=self.cfg.data.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=synced and ctx.world > 1)
        return [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]

    def summary_line(self, metrics: dict) -> str:
        raw = metrics["raw"]
        return f"eval exact match {raw['exact_match']:.2f} % ({raw['samples']} questions), loss {raw['loss']:.4f}"

    # ---- export
    def export(self, state: dict, out_dir: Path) -> None:
        from defocus_vlm.modeling_vlm import DefocusVLMForConditionalGeneration

        base = DefocusVLMForConditionalGeneration(self.model_config)
        base.generation_config = copy.deepcopy(self.generation_config)
        if self.cfg.model.lora.r:
            from .lora import export_lora

            export_lora(self.peft_model, state, base, self.processor, out_dir)
        else:
            export_model(base, state, self.processor, out_dir)


def run(cfg: InstructRunConfig, resume: bool = False) -> dict:
    return run_stage(InstructTask(cfg), cfg, resume)
