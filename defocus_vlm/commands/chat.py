"""Talk to a vision-language model about an image: ``defocus-vlm chat --model DIR --image IMG ["question"]``.

With a question: one greedy answer, streamed token by token as it is generated. Without one: an
interactive prompt (empty line or Ctrl-D ends it); the conversation so far stays in the context, the image
in the first turn."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported vision-language model directory")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("question", nargs="?", default=None, help="the question (omit for an interactive chat)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def reply(answerer, messages: list[dict], image, max_new_tokens: int, out=None) -> str:
    """Generate the assistant's next turn for ``messages``, printing tokens as they come (to ``out``,
    default: the sys.stdout of the moment, not the one at import time, which may be closed since)."""
    out = out or sys.stdout
    import torch
    from transformers import TextStreamer

    class _Printer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            print(text, end="\n" if stream_end else "", file=out, flush=True)

    processor = answerer.processor
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = answerer._inputs([image], [text])
    streamer = _Printer(answerer.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        generated = answerer.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                            pad_token_id=answerer.tokenizer.pad_token_id, streamer=streamer)
    new = generated[0, inputs["input_ids"].shape[1]:]
    return answerer.tokenizer.decode(new, skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.eval.vqa import VLMAnswerer
    from defocus_vlm.image_io import load_image

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    image = load_image(args.image)  # checked before the model is loaded
    answerer = VLMAnswerer(args.model, device=args.device, max_new_tokens=args.max_new_tokens)
    token = answerer.processor.image_token
    messages: list[dict] = []
    questions = [args.question] if args.question is not None else None
    while True:
        if questions is not None:
            if not questions:
                return 0
            question = questions.pop()
        else:
            try:
                question = input("you> ").strip()
            except EOFError:
                return 0
            if not question:
                return 0
            print("model> ", end="", flush=True)
        content = f"{token}\n{question}" if not messages else question
        messages.append({"role": "user", "content": content})
        answer = reply(answerer, messages, image, args.max_new_tokens)
        messages.append({"role": "assistant", "content": answer})
