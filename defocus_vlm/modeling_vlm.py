"""LLaVA-style vision-language model on a causal De-focus encoder, with streaming image prefill.

encoder -> selected tokens -> projector -> spliced into the language model's input embeddings at
the image placeholders -> any Hugging Face causal LM (attention with a KV cache, or recurrent like
Mamba). Because the encoder is causal, an image can also be encoded chunk by chunk and each chunk
of projected tokens pre-filled into the language model's cache as soon as it exists
(:meth:`DefocusVLMForConditionalGeneration.prefill_image_stream`); the result equals the one-shot
forward.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .compat import CACHE_NAME, cache_argument, cache_of, merge_cache_arguments
from .configuration_vlm import DefocusVLMConfig
from .modeling_defocus import DefocusVisionModel
from .remote_code import write_remote_code

# Language models whose multi-token forward with a non-empty cache is wrong: transformers' Mamba
# (5.17-5.23) restarts the selective scan from a zero state whenever more than one token comes in,
# ignoring the cached SSM state. After the first piece they are fed one token at a time, which takes
# their exact single-step path.
_STEPWISE_CONTINUATION_MODEL_TYPES = frozenset({"mamba", "falcon_mamba"})


@dataclass
class DefocusVLMOutput(ModelOutput):
    """loss: next-token cross-entropy from ``labels`` (or pre-shifted ``shift_labels``; image positions ignored).
    logits: every position's, the last ``logits_to_keep``, or with labels only those of the positions that predict a
    trained token (see ``forward``).
    image_hidden_states: the projected image tokens (num_images, tokens_per_image, hidden) of a one-shot forward.
    image_outputs: what :meth:`~DefocusVLMForConditionalGeneration.get_image_features` returned (the encoder's
    ``last_hidden_state``, ``hidden_states`` and ``attentions`` when asked, the projected tokens as
    ``pooler_output``), as transformers 5.x multimodal models carry it. The language model's cache is ``cache`` on
    transformers >= 5.24 (``past_key_values`` still reads it) and ``past_key_values`` before: the field is named as
    ``generate`` of the installed release reads it."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_NAME == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


class DefocusVLMProjector(nn.Module):
    """Encoder width -> LLM width: ``mlp2x_gelu`` (Linear, GELU, Linear) or ``linear``."""

    def __init__(self, config: DefocusVLMConfig):
        super().__init__()
        vision_dim, text_dim = config.vision_config.embed_dim, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU() if config.projector_type == "mlp2x_gelu" else nn.Identity()
        self.linear_2 = nn.Linear(text_dim, text_dim) if config.projector_type == "mlp2x_gelu" else nn.Identity()

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_tokens.to(self.linear_1.weight.dtype))))


def cache_holds_tokens(cache: Cache | None) -> bool:
    """Whether a language model's cache already holds a prefix (attention layers: a length; recurrent layers,
    whose cache has no length: a state)."""
    if cache is None:
        return False
    linear = list(getattr(cache, "is_linear", ()))
    if linear and all(linear):
        return bool(cache.has_previous_state())
    return cache.get_seq_length() > 0


def _runs(flags: torch.Tensor) -> list[tuple[int, int, bool]]:
    """(start, end, value) of each run of equal values in a 1-D bool tensor."""
    values, counts = torch.unique_consecutive(flags, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends, values.tolist()))


class DefocusVLMPreTrainedModel(PreTrainedModel):
    config_class = DefocusVLMConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_NAME]
    # Attention backends are the language model's business; these only let it choose.
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class DefocusVLMForConditionalGeneration(DefocusVLMPreTrainedModel, GenerationMixin):
    """``vision_tower`` (a :class:`DefocusVisionModel`), ``multi_modal_projector`` and ``language_model``
    (the whole causal LM, head included, built with ``AutoModelForCausalLM``).

    ``pixel_values`` hold every image of the batch in placeholder order (sample 0's images first);
    samples may have different numbers of images. ``generate`` works as for any causal LM (left-pad
    batches); ``generate(..., image_chunk_size=K)`` pre-fills the prompt with the streaming path.
    """

    def __init__(self, config: DefocusVLMConfig):
        super().__init__(config)
        self.vision_tower = DefocusVisionModel(config.vision_config)
        self.multi_modal_projector = DefocusVLMProjector(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # One config object per part, so what the parts change (e.g. resized embeddings) is what gets saved.
        config.vision_config, config.text_config = self.vision_tower.config, self.language_model.config
        self._is_stateful = getattr(self.language_model, "_is_stateful", False)
        llm_args = inspect.signature(self.language_model.forward).parameters
        self._cache_argument = cache_argument(self.language_model.forward)
        self._llm_takes_position_ids = "position_ids" in llm_args
        self._stepwise_continuation = config.text_config.model_type in _STEPWISE_CONTINUATION_MODEL_TYPES
        # Per instance, as the language model decides: this model's own forward has no graph break (its
        # data-dependent input checks run in eager calls only), nor has the image tower.
        self._can_compile_fullgraph = bool(getattr(self.language_model, "_can_compile_fullgraph", False))
        self.post_init()

    # ------------------------------------------------------------------ plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def _supports_default_dynamic_cache(self) -> bool:
        # A recurrent language model builds its own cache; transformers' generic prefill cannot take the
        # length of an all-recurrent DynamicCache (it raises), so generate must not pre-build one.
        return not self._is_stateful

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            import transformers

            # AutoProcessor is found here when the processor is saved to the same directory.
            auto_map = {"AutoConfig": "DefocusVLMConfig",
                        "AutoModelForImageTextToText": "DefocusVLMForConditionalGeneration",
                        "AutoProcessor": "DefocusVLMProcessor"}
            if hasattr(transformers, "AutoModelForVision2Seq"):
                auto_map["AutoModelForVision2Seq"] = "DefocusVLMForConditionalGeneration"
            write_remote_code(save_directory, auto_map, "config.json")

    # ------------------------------------------------------------------ image side
    def _select_tokens(self, tokens: torch.Tensor, start: int, total: int) -> torch.Tensor:
        """Keep the tokens ``vision_feature_select`` asks for from encoder tokens ``start..start+n`` of ``total``
        (a whole image or one streamed chunk)."""
        select, position = self.config.vision_feature_select, self.config.vision_config.cls_position
        if select == "all" or position == "none":
            return tokens
        local = (total - 1 if position == "end" else 0) - start  # the class token, in this chunk's indices
        inside = 0 <= local < tokens.shape[1]
        if select == "cls":
            return tokens[:, local:local + 1] if inside else tokens[:, :0]
        return torch.cat([tokens[:, :local], tokens[:, local + 1:]], dim=1) if inside else tokens

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                           output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling | tuple:
        """The image tower's output (``last_hidden_state``, and ``hidden_states`` / ``attentions`` when asked) with
        the projected image tokens, (num_images, tokens_per_image, LLM hidden size), as ``pooler_output``: the
        output type of transformers 5.x multimodal models. ``kwargs`` go to the image tower."""
        layer = self.config.vision_feature_layer
        want_hidden = output_hidden_states if output_hidden_states is not None \
            else self.vision_tower.config.output_hidden_states
        out = self.vision_tower(pixel_values, output_hidden_states=bool(want_hidden) or layer != -1,
                                output_attentions=output_attentions, return_dict=True, **kwargs)
        hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        out.pooler_output = self.multi_modal_projector(self._select_tokens(hidden, 0, hidden.shape[1]))
        if not want_hidden:
            out.hidden_states = None  # asked for by vision_feature_layer only
        return out

    def stream_image_features(self, pixel_values: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
        """Projected image tokens chunk by chunk (the vision tower's :meth:`~DefocusVisionModel.stream` of
        ``vision_feature_layer``); concatenated they equal :meth:`get_image_features`. Chunks left empty by the token
        selection are skipped."""
        total = self.vision_tower.num_tokens(*pixel_values.shape[-2:])
        start = 0
        for hidden in self.vision_tower.stream(pixel_values, chunk_size, layer=self.config.vision_feature_layer):
            tokens = self._select_tokens(hidden, start, total)
            start += hidden.shape[1]
            if tokens.shape[1]:
                yield self.multi_modal_projector(tokens)

    def _placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, L) bool: the image placeholders, from ``input_ids`` or, without them, as LLaVA finds them: the
        positions of ``inputs_embeds`` that hold the image token's embedding."""
        if self.config.image_token_id is None:
            raise ValueError("config.image_token_id is not set, so image placeholders cannot be found")
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        token = torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(token).to(inputs_embeds.dtype)).all(-1)

    def _image_token_mask(self, input_ids: torch.Tensor | None, pixel_values: torch.Tensor,
                          inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Where the image tokens go, after checking that placeholders and images agree. The counts are data, so
        traced code (torch.export, torch.compile) skips that check: it runs in eager calls only."""
        mask = self._placeholder_mask(input_ids, inputs_embeds)
        self.vision_tower.check_pixels(pixel_values)
        if torch.compiler.is_compiling():
            return mask
        per_image = self.config.num_image_tokens(*pixel_values.shape[-2:])
        found, given = int(mask.sum()), pixel_values.shape[0] * per_image
        per_sample = mask.sum(dim=1)
        if found != given or bool((per_sample % per_image).any()):
            source = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(f"image tokens and images do not match: {source} hold {found} image tokens "
                             f"({per_sample.tolist()} per sample), but the {pixel_values.shape[0]} images give "
                             f"{given} ({per_image} per image)")
        return mask

    # ------------------------------------------------------------------ language side
    def _run_language_model(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                            position_ids: torch.Tensor | None, cache, use_cache: bool | None,
                            logits_to_keep: int | torch.Tensor = 0, **kwargs) -> ModelOutput:
        if self._is_stateful and attention_mask is not None:
            # A recurrent LM masks its current inputs only; its state already holds the past.
            attention_mask = attention_mask[:, -inputs_embeds.shape[1]:]
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, self._cache_argument: cache,
                  "use_cache": use_cache, "return_dict": True}
        if position_ids is not None and self._llm_takes_position_ids:
            inputs["position_ids"] = position_ids
        if isinstance(logits_to_keep, torch.Tensor) or logits_to_keep:
            inputs["logits_to_keep"] = logits_to_keep
        return self.language_model(**inputs, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_chunk_size: int | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DefocusVLMOutput:
        """labels: next-token targets aligned with the inputs (shifted inside, -100 ignored); ``shift_labels``
        (in ``kwargs``, as transformers' sequence-parallel training passes them): targets already aligned with the
        logits, used instead of ``labels``. Targets that are the image token are ignored either way. With targets,
        the language model's head runs only at the positions where some sample of the batch has a trained next
        token (as ``logits_to_keep`` given as those positions would): ``logits`` are (batch, K, vocab) for those K
        positions in order, and the loss equals the loss of the full logits (traced code, whose shapes cannot depend
        on data, keeps every position). Call without labels for the logits of every position; ``logits_to_keep``
        cannot be combined with labels.
        inputs_embeds: instead of ``input_ids``, also with ``pixel_values`` (the placeholders are the positions that
        hold the image token's embedding, as in LLaVA). image_chunk_size: pre-fill with the streaming path
        (:meth:`prefill_image_stream`) instead of one shot; inference only, from ``input_ids``. cache: the language
        model's cache (``past_key_values``, its name before transformers 5.24, is accepted too). Image placeholders
        without ``pixel_values`` are an error in a new sequence, and plain tokens once the cache holds a prefix
        (the image is in the cache; assisted decoding re-reads drafted tokens)."""
        cache = merge_cache_arguments(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_chunk_size is not None:
            if labels is not None:
                raise ValueError("image_chunk_size (streaming prefill) is for inference; train without it")
            if input_ids is None:
                raise ValueError("image_chunk_size (streaming prefill) needs input_ids, not inputs_embeds")
            return self.prefill_image_stream(input_ids, pixel_values, image_chunk_size, attention_mask=attention_mask,
                                             position_ids=position_ids, cache=cache, logits_to_keep=logits_to_keep)
        image_outputs = None
        if pixel_values is not None:
            mask = self._image_token_mask(input_ids, pixel_values, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, return_dict=True,
                                                    **self._image_output_options(kwargs))
            features = image_outputs.pooler_output.to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], features)
        elif (not torch.compiler.is_compiling() and input_ids is not None and self.config.image_token_id is not None
              and not cache_holds_tokens(cache) and bool((input_ids == self.config.image_token_id).any())):
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        targets = self._next_token_targets(labels, kwargs.pop("shift_labels", None))
        if targets is not None:
            if isinstance(logits_to_keep, torch.Tensor) or logits_to_keep:
                raise ValueError("logits_to_keep is chosen from the labels when labels are given; pass one of them")
            if not torch.compiler.is_compiling():  # the positions are data: traced code keeps every logit
                # The head runs only where some sample trains the next token: with a large vocabulary the logits of
                # the image and prompt tokens are most of a step's memory, and their targets are all ignored anyway.
                logits_to_keep = targets.ne(-100).any(0).nonzero().squeeze(1).to(inputs_embeds.device)
                targets = targets[:, logits_to_keep.to(targets.device)]
        out = self._run_language_model(inputs_embeds, attention_mask, position_ids, cache, use_cache,
                                       logits_to_keep, **kwargs)
        loss = None
        if targets is not None:  # at least float32, as transformers' causal LMs compute it (float64 stays float64)
            logits = out.logits if out.logits.dtype == torch.float64 else out.logits.float()
            loss = fixed_cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device), num_items_in_batch)
        return DefocusVLMOutput(loss=loss, logits=out.logits, **{CACHE_NAME: cache_of(out)},
                                hidden_states=getattr(out, "hidden_states", None),
                                attentions=getattr(out, "attentions", None),
                                image_hidden_states=None if image_outputs is None else image_outputs.pooler_output,
                                image_outputs=image_outputs)

    def _next_token_targets(self, labels: torch.Tensor | None, shift_labels: torch.Tensor | None
                            ) -> torch.Tensor | None:
        """The target of each position's next token (B, L), -100 where none is trained: ``shift_labels`` as given,
        else ``labels`` shifted left. An image placeholder is never a target."""
        if shift_labels is None:
            if labels is None:
                return None
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        if self.config.image_token_id is None:
            return shift_labels
        return shift_labels.masked_fill(shift_labels == self.config.image_token_id, -100)

    def _image_output_options(self, kwargs: dict) -> dict:
        """What a forward's ``output_hidden_states`` / ``output_attentions`` ask of the image tower too; attention
        probabilities only where the tower has them (the vit mixer)."""
        options = {"output_hidden_states": kwargs.get("output_hidden_states")}
        if self.config.vision_config.mixer == "vit":
            options["output_attentions"] = kwargs.get("output_attentions")
        return options

    # ------------------------------------------------------------------ streaming prefill
    def prefill_image_stream(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor,
        chunk_size: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        chunk_callback: Callable[[int], None] | None = None,
        past_key_values: Cache | None = None,
    ) -> DefocusVLMOutput:
        """Pre-fill the prompt into the language model's cache in order: text before an image, then the
        image ``chunk_size`` encoder tokens at a time (each chunk encoded with the encoder's streaming
        mode, projected and pre-filled as soon as it exists), then the text after it.

        Returns the logits (all positions, or the last ``logits_to_keep``) and the filled cache (the
        output's cache field, see :class:`DefocusVLMOutput`): continue with ``generate``-style decoding, or call
        ``generate(..., image_chunk_size=chunk_size)`` to do both. ``chunk_callback(position)`` is called
        after each image chunk is in the cache (``position`` = prompt tokens pre-filled so far).
        Batches need the image placeholders at the same positions in every sample (left padding).
        ``past_key_values`` is the old name of ``cache``.
        """
        cache = merge_cache_arguments(cache, past_key_values)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if not self.config.vision_config.causal:
            raise ValueError("streaming needs a causal encoder; this one is non-causal (causal=False)")
        mask = self._image_token_mask(input_ids, pixel_values)
        if bool((mask != mask[:1]).any()):
            raise ValueError("streaming prefill needs the image placeholders at the same positions in every sample "
                             "of the batch (pad the prompts on the left), or one sample at a time")
        batch = input_ids.shape[0]
        images = pixel_values.view(batch, pixel_values.shape[0] // batch, *pixel_values.shape[1:])
        per_image = self.config.num_image_tokens(*pixel_values.shape[-2:])
        text_embeds = self.get_input_embeddings()(input_ids)
        prefill = _CachePrefill(self, input_ids.shape[1], attention_mask, position_ids, cache, logits_to_keep)
        next_image = 0
        for start, end, is_image in _runs(mask[0]):
            if not is_image:
                prefill.feed(text_embeds[:, start:end])
                continue
            for _ in range((end - start) // per_image):
                for features in self.stream_image_features(images[:, next_image], chunk_size):
                    prefill.feed(features.to(text_embeds.dtype))
                    if chunk_callback is not None:
                        chunk_callback(prefill.position)
                next_image += 1
        return DefocusVLMOutput(logits=prefill.logits(), **{CACHE_NAME: prefill.cache})

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                                      image_chunk_size: int | None = None, inputs_embeds: torch.Tensor | None = None,
                                      is_first_iteration: bool = False, **kwargs: Any) -> dict[str, Any]:
        # inputs_embeds named here: generate accepts them (with pixel_values too) only from a model that does
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds,
                                                             is_first_iteration=is_first_iteration, **kwargs)
        # The images go with the pass that fills the cache with the prompt: the prefill, every pass without a cache,
        # and an assistant model's first pass (assisted decoding runs it with is_first_iteration=False).
        cache = model_inputs.get(CACHE_NAME)
        if is_first_iteration or not kwargs.get("use_cache", True) or not cache_holds_tokens(cache):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_chunk_size"] = image_chunk_size
        elif self._is_stateful:
            # The recurrent state holds the past and new tokens are never padding; transformers would
            # otherwise turn the mask into a 4-D attention mask for the "compileable" recurrent cache.
            model_inputs["attention_mask"] = None
        return model_inputs


class _CachePrefill:
    """Feeds a prompt to the language model piece by piece: keeps the cache, the attention mask and
    the positions aligned, and collects the logits ``logits_to_keep`` asks for (0 = all).

    As in ``generate``, ``attention_mask`` may also cover tokens already in the cache (it ends with
    the prompt), while ``position_ids`` cover the prompt only."""

    def __init__(self, model: DefocusVLMForConditionalGeneration, length: int, attention_mask, position_ids, cache,
                 logits_to_keep: int):
        self.model, self.attention_mask, self.position_ids = model, attention_mask, position_ids
        self.cached_before = 0 if attention_mask is None else attention_mask.shape[1] - length
        self.cache_was_given = cache is not None
        self.cache = cache if cache is not None else DynamicCache(config=model.config.text_config)
        self.keep_from = length - logits_to_keep if logits_to_keep else 0
        self.position = 0
        self._logits: list[torch.Tensor] = []

    def feed(self, embeds: torch.Tensor) -> None:
        if self.model._stepwise_continuation and (self.position > 0 or self.cache_was_given):
            for i in range(embeds.shape[1]):
                self._forward(embeds[:, i:i + 1])
        elif embeds.shape[1]:
            self._forward(embeds)

    def _forward(self, embeds: torch.Tensor) -> None:
        start, end = self.position, self.position + embeds.shape[1]
        mask = None if self.attention_mask is None else self.attention_mask[:, :self.cached_before + end]
        positions = None if self.position_ids is None else self.position_ids[..., start:end]
        keep = max(end - max(start, self.keep_from), 0)
        out = self.model._run_language_model(embeds, mask, positions, self.cache, use_cache=True,
                                             logits_to_keep=keep or 1)
        self.cache = cache_of(out)
        if keep:
            self._logits.append(out.logits[:, -keep:])
        self.position = end

    def logits(self) -> torch.Tensor:
        return torch.cat(self._logits, dim=1)
