"""LLaVA-format conversation data for instruction tuning (stage 3).

A record is ``{"id", "image": "a.png" | ["a.png", ...] (optional), "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`` with image paths relative to an
image folder. Each ``<image>`` placeholder marks where one image's tokens go.

Labels come from the tokenizer's own chat template, never from hand-written per-template rules:
the conversation is rendered once and the character spans of the assistant turns are found either
from the template's ``{% generation %}`` blocks (``return_assistant_tokens_mask``) or, for templates
without them, by rendering growing prefixes of the conversation (the text up to the assistant's
generation prompt, and up to the end of its turn). Tokens overlapping an assistant span are trained
on; everything else is ``-100``. The processor then expands each image placeholder to the model's
number of image tokens (``DefocusVLMProcessor.expand_image_tokens``), and over-long samples are
truncated, dropped or refused as configured; image tokens are never cut."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from defocus_vlm.constants import IMAGE_TOKEN
from defocus_vlm.image_io import ImageError, load_image

from .classification import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
OVERLONG_POLICIES = ("truncate", "drop", "error")


@dataclass
class Conversation:
    """One validated LLaVA record: chat messages (``role``/``content``) and its image paths."""

    id: str
    messages: list[dict]
    images: list[str]


@dataclass
class EncodedSample:
    id: str
    input_ids: np.ndarray  # image placeholders already expanded
    labels: np.ndarray  # IGNORE_INDEX outside assistant turns
    images: list[str]


# --------------------------------------------------------------------------- reading
def _parse_record(record, where: str, image_token: str) -> Conversation:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise DataError(f"{where}: expected an object with a 'conversations' list")
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError(f"{where}: 'image' must be a path or a list of paths, got {record.get('image')!r}")
    messages = []
    for turn in record["conversations"]:
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: each turn needs 'from' (one of {sorted(ROLES)}) and a string 'value', "
                            f"got {turn!r}")
        content = turn["value"].replace(IMAGE_TOKEN, image_token)
        if role == "assistant" and image_token in content:
            raise DataError(f"{where}: an assistant turn contains the image placeholder {image_token!r}")
        messages.append({"role": role, "content": content})
    roles = [m["role"] for m in messages]
    if "assistant" not in roles or roles[0] == "assistant":
        raise DataError(f"{where}: a conversation needs a user turn before its first assistant turn, got roles "
                        f"{roles}")
    placeholders = sum(m["content"].count(image_token) for m in messages)
    if placeholders != len(images):
        raise DataError(f"{where}: {len(images)} image(s) but {placeholders} {IMAGE_TOKEN} placeholder(s)")
    return Conversation(str(record.get("id", where)), messages, images)


def read_llava_json(path: str | os.PathLike, image_token: str = IMAGE_TOKEN) -> list[Conversation]:
    """Read a LLaVA JSON list (or JSONL, one record a line) and validate every record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA conversation file not found: {path}")
    text = path.read_text()
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty list of conversation records")
    return [_parse_record(r, f"{path}[{i}]", image_token) for i, r in enumerate(records)]


# --------------------------------------------------------------------------- masks from the chat template
def _render(tokenizer, messages: list[dict], chat_template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_char_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], chat_template: str | None = None
                         ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn, found by rendering
    prefixes: a turn starts where ``messages[:i]`` + generation prompt ends and stops where
    ``messages[:i + 1]`` ends. Templates whose prefixes are not prefixes of the full text are refused."""
    text = _render(tokenizer, messages, chat_template, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], chat_template, True)
        through = _render(tokenizer, messages[: i + 1], chat_template, False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                "the chat template renders a conversation prefix that is not a prefix of the whole conversation "
                f"(assistant turn {i}); give it {{% generation %}} blocks or use another template"
            )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return text, spans


def has_generation_blocks(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> bool:
    template = chat_template or tokenizer.chat_template or ""
    return "generation %}" in template and "endgeneration" in template


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], chat_template: str | None = None
                          ) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn."""
    if has_generation_blocks(tokenizer, chat_template):
        out = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    text, spans = assistant_char_spans(tokenizer, messages, chat_template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s < span_end and e > span_start for span_start, span_end in spans) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


# --------------------------------------------------------------------------- encoding with image tokens
class ConversationEncoder:
    """Conversation -> (input_ids, labels) through ``processor`` (a DefocusVLMProcessor): its chat template
    renders the conversation and it expands each image placeholder to the model's image tokens. Samples
    longer than ``max_length``: ``truncate`` cuts text at the end (a sample is dropped when its image
    tokens do not fit or no answer token is left), ``drop`` drops them, ``error`` raises. ``dropped``
    counts the dropped samples by reason."""

    def __init__(self, processor, max_length: int = 2048, overlong: str = "truncate"):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        self.processor, self.tokenizer, self.chat_template = processor, processor.tokenizer, processor.chat_template
        self.image_token_id = processor.image_token_id
        self.max_length, self.overlong = int(max_length), overlong
        self.dropped: Counter = Counter()

    def encode(self, conv: Conversation) -> EncodedSample | None:
        """The encoded sample, or None when it is dropped (see ``dropped``)."""
        ids, mask = tokenize_conversation(self.tokenizer, conv.messages, self.chat_template)
        found = ids.count(self.image_token_id)
        if found != len(conv.images):
            raise DataError(f"sample {conv.id}: the chat template produced {found} image token(s) for "
                            f"{len(conv.images)} image(s)")
        labels = [t if trained and t != self.image_token_id else IGNORE_INDEX for t, trained in zip(ids, mask)]
        input_ids, labels = self.processor.expand_image_tokens(ids, labels)
        if len(input_ids) > self.max_length:
            if self.overlong == "error":
                raise DataError(f"sample {conv.id} has {len(input_ids)} tokens, more than max_length "
                                f"{self.max_length} (set data.overlong to truncate or drop)")
            if self.overlong == "drop":
                return self._drop("too long")
            image_positions = np.flatnonzero(input_ids == self.image_token_id)
            if len(image_positions) and image_positions[-1] >= self.max_length:
                return self._drop("image tokens do not fit")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if not (labels != IGNORE_INDEX).any():
            return self._drop("no answer tokens")
        return EncodedSample(conv.id, input_ids, labels, conv.images)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        return None

    def encode_prompt(self, messages: list[dict]) -> np.ndarray:
        """Generation prompt ids (image tokens expanded) for ``messages`` ending with a user turn."""
        text = _render(self.tokenizer, messages, self.chat_template, True)
        return self.processor.expand_image_tokens(self.tokenizer(text, add_special_tokens=False)["input_ids"])[0]


# --------------------------------------------------------------------------- dataset and batches
def resolve_images(conversations: list[Conversation], image_folder: str | os.PathLike, where: str) -> None:
    """Refuse the data up front when an image file is missing."""
    folder = Path(image_folder)
    for conv in conversations:
        for image in conv.images:
            if not (folder / image).is_file():
                raise FileNotFoundError(f"{where}: image {image!r} of sample {conv.id} not found under {folder}")


class LlavaDataset(Dataset):
    """Encoded samples with their images run through ``image_processor`` (a DefocusImageProcessor).

    hflip / vflip: probability of mirroring each training image left-right / upside down, drawn from
    the sampler's per-sample seed (so a resumed run sees the same images). Off by default, as in
    LLaVA; only for data whose answers do not change under the flip (no "left of" questions).
    on_corrupt: "skip" replaces a sample whose image cannot be read by the next one (with a warning),
    "fail" stops. ``load`` / ``where`` make it a source for ``verify_source`` (checked before training)."""

    def __init__(self, samples: list[EncodedSample], image_folder: str | os.PathLike, image_processor,
                 hflip: float = 0.0, vflip: float = 0.0, on_corrupt: str = "fail"):
        if not samples:
            raise DataError("no training sample is left after encoding (all were dropped)")
        self.samples, self.image_folder, self.image_processor = samples, Path(image_folder), image_processor
        self.flips, self.on_corrupt = (hflip, vflip), on_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> list[Image.Image]:
        return [load_image(self.image_folder / p) for p in self.samples[index].images]

    def where(self, index: int) -> str:
        return f"sample {index} ({', '.join(self.samples[index].images) or 'no image'} under {self.image_folder})"

    def load_images(self, paths: list[str], seed: int | None = None) -> torch.Tensor | None:
        if not paths:
            return None
        try:
            images = [load_image(self.image_folder / p) for p in paths]
        except ImageError as err:
            raise DataError(str(err)) from err
        if seed is not None and any(self.flips):
            rng = np.random.default_rng(seed)
            transposes = (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM)
            for i in range(len(images)):
                for p, transpose in zip(self.flips, transposes):
                    if rng.random() < p:
                        images[i] = images[i].transpose(transpose)
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        # the training sampler gives (index, per-sample seed); evaluation gives an index (no flips)
        index, seed = item if isinstance(item, tuple) else (item, None)
        for tries in range(len(self.samples)):
            s = self.samples[(index + tries) % len(self.samples)]
            try:
                pixels = self.load_images(s.images, seed)
                break
            except DataError as err:
                if self.on_corrupt != "skip":
                    raise DataError(f"{err} (set data.on_corrupt=skip to skip such samples)") from err
                warnings.warn(f"skipping a sample with an unreadable image (data.on_corrupt=skip): {err}",
                              stacklevel=2)
        else:
            raise DataError(f"no sample of {self.image_folder} has readable images")
        return {"input_ids": torch.from_numpy(s.input_ids), "labels": torch.from_numpy(s.labels),
                "pixel_values": pixels}


class LlavaCollator:
    """Pads a list of samples into one batch: ``input_ids``, ``attention_mask``, ``labels`` and the
    images of all samples concatenated in order (``pixel_values``, None when the batch has none)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.padding_side = int(pad_token_id), padding_side

    def _pad(self, rows: list[torch.Tensor], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, length - len(row):] = row
        return out

    def __call__(self, batch: list[dict]) -> dict:
        length = max(len(s["input_ids"]) for s in batch)
        ids = [s["input_ids"] for s in batch]
        out = {
            "input_ids": self._pad(ids, self.pad_token_id, length),
            "attention_mask": self._pad([torch.ones_like(r) for r in ids], 0, length),
        }
        if all("labels" in s for s in batch):
            out["labels"] = self._pad([s["labels"] for s in batch], IGNORE_INDEX, length)
        images = [s["pixel_values"] for s in batch if s.get("pixel_values") is not None]
        out["pixel_values"] = torch.cat(images) if images else None
        return out
