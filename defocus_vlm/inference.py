"""Answers from an exported vision-language model, for everything that asks one: ``defocus-vlm chat``
(a streamed reply in a conversation), ``eval vqa`` (batched greedy answers) and the lmms-eval plugin
(answers and continuation log-probabilities)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from transformers import BatchFeature

from .user_files import check_model_dir


def resolve_device(device: str | None) -> torch.device:
    """``auto`` / None: CUDA when available, else the CPU; otherwise the device named."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA device is available here")
    return torch.device(device)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` (bf16 on a CUDA device that has it, else float32) or a named floating dtype."""
    if dtype == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


class VLMAnswerer:
    """Greedy answers of an exported vision-language model (``AutoModelForImageTextToText`` and its
    ``AutoProcessor``): each prompt goes through the processor's chat template as one user turn with
    the image first, and a batch is left-padded and generated at once (until the end-of-sequence token
    of the model's generation config, or ``max_new_tokens``)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 16,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import defocus_vlm  # noqa: F401 - registers the Auto classes

        model_dir = check_model_dir(model_dir, "defocus_vlm")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device.type)
        self.max_new_tokens = max_new_tokens
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # generated tokens must follow every prompt directly
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()

    def chat_text(self, prompt: str) -> str:
        """The prompt as one user turn, written as in LLaVA's data ("<image>\\n" + prompt), followed by
        the assistant's generation prompt."""
        messages = [{"role": "user", "content": f"{self.processor.image_token}\n{prompt}"}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> BatchFeature:
        """Processor inputs of ``images`` and already templated ``texts``, on the model's device and dtype."""
        inputs = self.processor(images=list(images), text=list(texts), padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def __call__(self, batch: Sequence[tuple[Image.Image, str]], max_new_tokens: int | None = None) -> list[str]:
        if not batch:
            return []
        images, prompts = zip(*batch)
        inputs = self.encode(images, [self.chat_text(p) for p in prompts])
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens or self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def stream_reply(self, messages: list[dict], image: Image.Image, on_text: Callable[[str, bool], None],
                     max_new_tokens: int | None = None) -> str:
        """The assistant's next turn for a chat (``messages`` in the processor's chat format, the image
        belonging to the first user turn), greedy; ``on_text(text, end)`` receives the text as it is
        generated. Returns the whole reply."""
        from transformers import TextStreamer

        class _Callback(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text, stream_end)

        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.encode([image], [text])
        streamer = _Callback(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            generated = self.model.generate(**inputs, do_sample=False,
                                            max_new_tokens=max_new_tokens or self.max_new_tokens,
                                            pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)
        return self.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def continuation_logprob(self, image: Image.Image, prompt: str, continuation: str) -> tuple[float, bool]:
        """Log-probability of ``continuation`` as the start of the assistant's answer, and whether
        greedy decoding would produce exactly it (lmms-eval's ``loglikelihood``)."""
        inputs = self.encode([image], [self.chat_text(prompt)])
        n_context = inputs["input_ids"].shape[1]
        # the continuation is tokenized on its own, so the context's tokens stay exactly as in generation
        target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if target.numel() == 0:
            raise ValueError(f"the continuation {continuation!r} has no tokens")
        target = target.to(self.device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], target[None]], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.inference_mode():
            logits = self.model(**inputs).logits[0, n_context - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        total = logprobs.gather(-1, target[:, None]).sum().item()
        return total, bool((logits.argmax(-1) == target).all())
