"""Hugging Face models around :class:`~defocus_vlm.encoders.DefocusEncoder`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from defocus_vlm.encoders.model import DefocusEncoder, init_module

from .configuration_defocus import DefocusVisionConfig
from .remote_code import write_remote_code


@dataclass
class DefocusImageClassifierOutput(ModelOutput):
    """logits: from the class token. aux_logits: the auxiliary head (pooled: (B, C); token: (B, L, C)),
    computed in training or when labels are given."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    aux_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class DefocusPreTrainedModel(PreTrainedModel):
    config_class = DefocusVisionConfig
    base_model_prefix = "defocus"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock", "MambaBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_module(module)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        for module in self.modules():
            if isinstance(module, DefocusEncoder):
                module.set_grad_checkpointing(enable)

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_remote_code(save_directory, {
                "AutoConfig": "DefocusVisionConfig",
                "AutoModel": "DefocusVisionModel",
                "AutoModelForImageClassification": "DefocusVisionForImageClassification",
                # Kept here, not in preprocessor_config.json: an image-processor auto_map makes
                # transformers look for a remote *video* processor and prompt in pipelines.
                "AutoImageProcessor": "DefocusImageProcessor",
            }, "config.json")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_gradient_checkpointing(False)


class DefocusVisionModel(DefocusPreTrainedModel):
    """Outputs ``last_hidden_state`` (all tokens, class token included) and ``pooler_output``
    (the class token)."""

    def __init__(self, config: DefocusVisionConfig):
        super().__init__(config)
        self.encoder = DefocusEncoder(config.encoder_config())
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        drop_path_rate: float | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        tokens, hidden = self.encoder(pixel_values, drop_path_rate, output_hidden_states)
        pooled = self.encoder.pooled(tokens)
        hidden = tuple(hidden) if hidden is not None else None
        if not return_dict:
            return tuple(v for v in (tokens, pooled, hidden) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=pooled, hidden_states=hidden)

    def stream(self, pixel_values: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
        """Yield ``last_hidden_state`` chunk by chunk (causal presets only); the last chunk ends
        with the class token. Concatenated, the chunks equal the one-shot output."""
        return self.encoder.stream(pixel_values, chunk_size)


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


class DefocusVisionForImageClassification(DefocusPreTrainedModel):
    """Class-token classifier with the paper's auxiliary head (``aux_head``)."""

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
        **kwargs,
    ) -> DefocusImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.defocus(pixel_values, output_hidden_states=output_hidden_states, return_dict=True,
                           drop_path_rate=drop_path_rate)
        tokens = out.last_hidden_state
        logits = self.head(out.pooler_output)
        aux_logits = None
        if self.aux_head is not None and (labels is not None or self.training):
            patches = self.defocus.encoder.patch_tokens(tokens)
            aux_in = patches.mean(1) if self.config.aux_loss == "pooled" else patches
            aux_logits = self.aux_head(aux_in)
        loss = None
        if labels is not None:
            loss = soft_cross_entropy(logits, labels)
            if aux_logits is not None:
                loss = (loss + self._aux_loss(aux_logits, labels)) / 2
        if not return_dict:
            return tuple(v for v in (loss, logits, aux_logits, out.hidden_states) if v is not None)
        return DefocusImageClassifierOutput(loss=loss, logits=logits, aux_logits=aux_logits,
                                            hidden_states=out.hidden_states)

    @staticmethod
    def _aux_loss(aux_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if aux_logits.dim() == 2:
            return soft_cross_entropy(aux_logits, labels)
        tokens = aux_logits.shape[1]  # every patch token gets its image's target
        target = labels[:, None].expand(-1, tokens, *labels.shape[1:]).flatten(0, 1)
        return soft_cross_entropy(aux_logits.flatten(0, 1), target)
