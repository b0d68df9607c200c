"""Hugging Face models around :class:`~defocus_vlm.encoders.DefocusEncoder`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from defocus_vlm.encoders.blocks import MambaBlock, TransformerBlock
from defocus_vlm.encoders.config import EncoderConfig
from defocus_vlm.encoders.model import DefocusEncoder, init_module

from .configuration_defocus import DefocusVisionConfig
from .remote_code import RemoteCodeMixin

# transformers' attention implementations -> the vit mixer's attention kernel. "sdpa" (transformers' default)
# keeps the fused automatic choice (PyTorch SDPA, or FlexAttention on CUDA when the decay is on); "eager" is the
# reference path that forms the probabilities (what output_attentions needs). Retention and the selective scan
# have no softmax attention: for those mixers the setting selects nothing.
ATTENTION_BACKENDS = {"eager": "reference", "sdpa": "auto", "flex_attention": "flex"}


@dataclass
class DefocusImageClassifierOutput(ModelOutput):
    """logits: from the class token. aux_logits: the auxiliary head (pooled: (B, C); token: (B, L, C)),
    computed in training or when labels are given."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    aux_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class DefocusTransformerLayer(GradientCheckpointingLayer, TransformerBlock):
    """A :class:`TransformerBlock` (vit, retnet) that transformers' activation checkpointing switches on and off."""


class DefocusMambaLayer(GradientCheckpointingLayer, MambaBlock):
    """A :class:`MambaBlock` that transformers' activation checkpointing switches on and off."""


def checkpointing_layer(cfg: EncoderConfig) -> nn.Module:
    """The encoder's block for ``cfg`` as a transformers ``GradientCheckpointingLayer`` (same weights and names)."""
    return DefocusMambaLayer(cfg) if cfg.mixer == "mamba" else DefocusTransformerLayer(cfg)


class DefocusPreTrainedModel(RemoteCodeMixin, PreTrainedModel):
    config_class = DefocusVisionConfig
    base_model_prefix = "defocus"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DefocusTransformerLayer", "DefocusMambaLayer"]
    # The vit mixer's kernels (see ATTENTION_BACKENDS); flash-attention cannot add the per-head distance decay.
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_module(module)

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (what PEFT's ``enable_input_require_grads`` hooks)."""
        return self.base_model.encoder.patch_embed.proj

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        implementation = super().get_correct_attn_implementation(requested_attention, is_init_check)
        if implementation not in ATTENTION_BACKENDS:
            raise ValueError(f"{type(self).__name__} runs its own attention kernels: attn_implementation must be one "
                             f"of {sorted(ATTENTION_BACKENDS)}, got {implementation!r}")
        return implementation

    def _attention_backend(self) -> str:
        return ATTENTION_BACKENDS.get(self.config._attn_implementation, "auto")

    def remote_auto_map(self) -> dict[str, str]:
        return {
            "AutoConfig": "DefocusVisionConfig",
            "AutoModel": "DefocusVisionModel",
            "AutoModelForImageClassification": "DefocusVisionForImageClassification",
            # Kept here, not in preprocessor_config.json: an image-processor auto_map makes
            # transformers look for a remote *video* processor and prompt in pipelines.
            "AutoImageProcessor": "DefocusImageProcessor",
        }


class DefocusVisionModel(DefocusPreTrainedModel):
    """Outputs ``last_hidden_state`` (all tokens, class token included) and ``pooler_output``
    (the class token); ``attentions`` with ``output_attentions`` (vit mixer only)."""

    def __init__(self, config: DefocusVisionConfig):
        super().__init__(config)
        self.encoder = DefocusEncoder(config.encoder_config(), block_factory=checkpointing_layer)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        drop_path_rate: float | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.encoder(pixel_values, drop_path_rate, output_hidden_states, output_attentions=output_attentions,
                           attn_backend=self._attention_backend())
        tokens = out.last_hidden_state
        pooled = self.encoder.pooled(tokens)
        hidden = tuple(out.hidden_states) if out.hidden_states is not None else None
        attentions = tuple(out.attentions) if out.attentions is not None else None
        if not return_dict:
            return tuple(v for v in (tokens, pooled, hidden, attentions) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=pooled, hidden_states=hidden,
                                          attentions=attentions)

    def stream(self, pixel_values: torch.Tensor, chunk_size: int, layer: int = -1) -> Iterator[torch.Tensor]:
        """Yield the tokens of ``layer``, ``chunk_size`` encoder tokens at a time (causal presets only); the last
        chunk ends with the class token (``cls_position="end"``). Concatenated, the chunks equal the one-shot output,
        and each chunk depends only on the pixels of its patches and those before it.

        layer: -1 (default) ``last_hidden_state``; any other value indexes ``hidden_states`` of
        ``forward(output_hidden_states=True)`` (0 = the patch embeddings, k = the output of block k, before the final
        norm; negative values count from the end). Malformed input is refused when ``stream`` is called."""
        return self.encoder.stream(pixel_values, chunk_size, layer)

    def num_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Tokens of a ``height x width`` image (default ``config.img_size``): its patches plus the class token."""
        return self.encoder.num_tokens(height, width)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Raise one clear ValueError for input this model cannot take (not (B, C, H, W), the wrong number of channels,
        a size that is not a multiple of the patch size, NaN or infinite values: the value check runs in eager calls
        only)."""
        self.encoder.check_pixels(pixel_values)


def _head(config: DefocusVisionConfig) -> nn.Module:
    dim, classes = config.embed_dim, config.num_labels
    if classes <= 0:
        return nn.Identity()
    if config.head_type == "mlp":
        hidden = config.head_hidden_mult * dim
        return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    return nn.Linear(dim, classes)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices (B,) or soft / mixup targets (B, C)."""
    if target.dim() == logits.dim() and target.is_floating_point():
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target)


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None) -> torch.Tensor:
    """The loss ``config.problem_type`` names, as transformers' ``ViTForImageClassification`` computes it:
    "regression" (MSE), "single_label_classification" (cross-entropy; class indices, or probabilities per class),
    "multi_label_classification" (BCE with logits). ``None`` is inferred: one output is a regression, otherwise
    class indices (B,) or soft / mixup targets (B, C) give cross-entropy."""
    if problem_type is None and logits.shape[-1] == 1:
        problem_type = "regression"
    if problem_type == "regression":
        if logits.shape[-1] == 1:  # one output: targets (B,) or (B, 1)
            return F.mse_loss(logits.float().squeeze(-1), labels.float().reshape(logits.shape[:-1]))
        return F.mse_loss(logits.float(), labels.float())
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    if problem_type in (None, "single_label_classification"):
        return soft_cross_entropy(logits, labels)
    raise ValueError(f"problem_type must be one of {PROBLEM_TYPES} or None, got {problem_type!r}")


class DefocusVisionForImageClassification(DefocusPreTrainedModel):
    """Class-token classifier with the paper's auxiliary head (``aux_head``). The loss follows
    ``config.problem_type`` (:func:`classification_loss`); with the auxiliary head it is (class token + aux) / 2."""

    def __init__(self, config: DefocusVisionConfig):
        super().__init__(config)
        self.defocus = DefocusVisionModel(config)
        self.head = _head(config)
        self.aux_head = _head(config) if config.aux_loss != "none" else None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        drop_path_rate: float | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> DefocusImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.defocus(pixel_values, output_hidden_states=output_hidden_states, return_dict=True,
                           drop_path_rate=drop_path_rate, output_attentions=output_attentions)
        tokens = out.last_hidden_state
        logits = self.head(out.pooler_output)
        aux_logits = None
        if self.aux_head is not None and (labels is not None or self.training):
            patches = self.defocus.encoder.patch_tokens(tokens)
            aux_in = patches.mean(1) if self.config.aux_loss == "pooled" else patches
            aux_logits = self.aux_head(aux_in)
        loss = None
        if labels is not None:
            problem_type = self.config.problem_type
            loss = classification_loss(logits, labels, problem_type)
            if aux_logits is not None:
                loss = (loss + self._aux_loss(aux_logits, labels, problem_type)) / 2
        if not return_dict:
            return tuple(v for v in (loss, logits, aux_logits, out.hidden_states, out.attentions) if v is not None)
        return DefocusImageClassifierOutput(loss=loss, logits=logits, aux_logits=aux_logits,
                                            hidden_states=out.hidden_states, attentions=out.attentions)

    @staticmethod
    def _aux_loss(aux_logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None) -> torch.Tensor:
        if aux_logits.dim() == 2:
            return classification_loss(aux_logits, labels, problem_type)
        tokens = aux_logits.shape[1]  # every patch token gets its image's target
        target = labels[:, None].expand(-1, tokens, *labels.shape[1:]).flatten(0, 1)
        return classification_loss(aux_logits.flatten(0, 1), target, problem_type)
