"""CLIP-style dual encoder (stage 2): a causal De-focus image tower pooled at its class token and any
Hugging Face text model, each linearly projected into one embedding space.

The API follows transformers' ``CLIPModel``: ``get_image_features`` / ``get_text_features`` return
the tower output with the *projected* (not normalised) embedding as ``pooler_output``, and
``forward`` returns ``logits_per_image`` / ``logits_per_text`` (``logit_scale * cos``, plus
``logit_bias`` for SigLIP)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_clip import DefocusCLIPConfig
from .modeling_defocus import DefocusVisionModel
from .remote_code import RemoteCodeMixin

if TYPE_CHECKING:
    from transformers.image_processing_utils import BaseImageProcessor


@dataclass
class DefocusCLIPOutput(ModelOutput):
    """As transformers' ``CLIPOutput``, plus the (clamped, exponentiated) ``logit_scale`` and the
    ``logit_bias`` (SigLIP) that produced the logits: a trainer scoring a larger batch needs them."""

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    logit_bias: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, L, D) -> (B, D). "last": the last non-pad token (left or right padding); "mean": the
    mean over non-pad tokens; "first": token 0."""
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.device)
    if how == "first":
        return hidden[:, 0]
    if how == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * mask.long()).argmax(dim=1)  # the highest position that is not padding
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    raise ValueError(f"unknown text pooling {how!r}; expected last, mean or first")


class DefocusCLIPPreTrainedModel(RemoteCodeMixin, PreTrainedModel):
    config_class = DefocusCLIPConfig
    base_model_prefix = "defocus_clip"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # Each tower checks the attention implementation it is given (the image tower: see modeling_defocus).
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, DefocusCLIPModel):
            # nn.init (not fill_): transformers skips these for weights loaded from a checkpoint
            nn.init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                nn.init.constant_(module.logit_bias, self.config.logit_bias_init_value)
        elif isinstance(module, nn.Linear):  # the projections (the towers initialise themselves)
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class DefocusCLIPModel(DefocusCLIPPreTrainedModel):
    """Towers may be passed in already built (e.g. loaded from a stage-1 classifier and from a
    pretrained text model); otherwise they are built from ``config``."""

    def __init__(
        self,
        config: DefocusCLIPConfig,
        vision_model: DefocusVisionModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else DefocusVisionModel(config.vision_config)
        self.text_model = text_model if text_model is not None else AutoModel.from_config(config.text_config)
        # one config object per tower, shared with the composite config (what is saved is what runs)
        self.vision_model.config, self.text_model.config = config.vision_config, config.text_config
        self.visual_projection = nn.Linear(config.vision_hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_hidden_size, config.projection_dim, bias=False)
        # shape (1,), not a 0-d tensor: DeepSpeed cannot broadcast 0-d parameters
        self.logit_scale = nn.Parameter(torch.tensor([float(config.logit_scale_init_value)]))
        bias = config.logit_bias_init_value
        self.logit_bias = nn.Parameter(torch.tensor([float(bias)])) if bias is not None else None
        self._locked: set[str] = set()
        self.post_init()

    # ------------------------------------------------------------------ towers
    def lock_image_tower(self) -> None:
        """Freeze the image tower (kept in eval mode, run without a graph); its projection still trains."""
        self._lock("vision_model")

    def lock_text_tower(self) -> None:
        """Freeze the text tower (kept in eval mode, run without a graph); its projection still trains."""
        self._lock("text_model")

    def _lock(self, name: str) -> None:
        tower = getattr(self, name)
        tower.requires_grad_(False)
        tower.eval()
        self._locked.add(name)

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        for name in self._locked:  # no dropout / drop path in a frozen tower
            getattr(self, name).eval()
        return self

    def _grad_context(self, name: str):
        return torch.no_grad() if name in self._locked else nullcontext()

    def save_image_tower(self, save_directory: str | os.PathLike,
                         image_processor: BaseImageProcessor | None = None) -> None:
        """Write the image tower as a standalone ``DefocusVisionModel`` directory (``AutoModel``
        loads it; stage 3 starts from it), with ``image_processor`` when given."""
        self.vision_model.save_pretrained(save_directory)
        if image_processor is not None:
            image_processor.save_pretrained(save_directory)

    # ------------------------------------------------------------------ features
    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, drop_path_rate: float | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """The image tower's output, ``pooler_output`` replaced by the projected class token. ``kwargs`` go to the
        tower (``output_hidden_states``, ``output_attentions``); ``return_dict=False`` (or ``config.return_dict``)
        gives a tuple, as transformers' ``CLIPModel``."""
        with self._grad_context("vision_model"):
            out = self.vision_model(pixel_values, return_dict=True, drop_path_rate=drop_path_rate, **kwargs)
        out.pooler_output = self.visual_projection(out.pooler_output)
        return out

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """The text tower's output, ``pooler_output`` = the projected pooled token(s) (``config.text_pooling``).
        ``kwargs`` go to the tower; ``return_dict`` as for :meth:`get_image_features`."""
        with self._grad_context("text_model"):
            out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        pooled = pool_text(out.last_hidden_state, attention_mask, self.config.text_pooling)
        return BaseModelOutputWithPooling(
            last_hidden_state=out.last_hidden_state,
            pooler_output=self.text_projection(pooled.to(self.text_projection.weight.dtype)),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )

    def scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max), self.logit_bias

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        drop_path_rate: float | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DefocusCLIPOutput | tuple:
        vision = self.get_image_features(pixel_values, drop_path_rate=drop_path_rate, return_dict=True)
        text = self.get_text_features(input_ids, attention_mask, return_dict=True)
        image_embeds = F.normalize(vision.pooler_output, dim=-1)
        text_embeds = F.normalize(text.pooler_output, dim=-1)
        scale, bias = self.scale_and_bias()
        logits_per_text = scale * text_embeds @ image_embeds.T
        if bias is not None:
            logits_per_text = logits_per_text + bias
        loss = None
        if return_loss:  # this batch only; training gathers features over processes instead
            from .contrastive import contrastive_loss

            loss = contrastive_loss(self.config.loss_type, image_embeds, text_embeds, scale, bias)
        out = DefocusCLIPOutput(
            loss=loss, logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
            text_embeds=text_embeds, image_embeds=image_embeds, logit_scale=scale, logit_bias=bias,
            text_model_output=text, vision_model_output=vision,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ saving
    def remote_auto_map(self) -> dict[str, str]:
        return {"AutoConfig": "DefocusCLIPConfig", "AutoModel": "DefocusCLIPModel",
                "AutoProcessor": "DefocusCLIPProcessor"}


def load_clip(model_dir: str | os.PathLike) -> DefocusCLIPModel:
    """A saved :class:`DefocusCLIPModel`, or one clear error saying what the directory holds instead."""
    from pathlib import Path

    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model at {model_dir}: config.json missing (expected a saved CLIP directory)")
    config = AutoConfig.from_pretrained(model_dir)
    if not isinstance(config, DefocusCLIPConfig):
        raise ValueError(f"{model_dir} holds a {config.model_type!r} model, expected a "
                         f"{DefocusCLIPConfig.model_type!r} (CLIP) model")
    return DefocusCLIPModel.from_pretrained(model_dir, config=config)


def export_image_tower(clip_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write the image tower of a saved CLIP directory (with its image processor) as a
    ``DefocusVisionModel`` directory; returns ``out_dir``."""
    from transformers import AutoProcessor

    model = load_clip(clip_dir)
    try:
        processor = AutoProcessor.from_pretrained(clip_dir).image_processor
    except (OSError, ValueError):  # a model saved without its processor
        processor = None
    model.save_image_tower(out_dir, processor)
    return str(out_dir)
