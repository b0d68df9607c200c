"""Talk to a vision-language model about an image: ``defocus-vlm chat --model DIR --image IMG ["question"]``.

With a question: one greedy answer, streamed token by token as it is generated. Without one: an
interactive prompt (empty line or Ctrl-D ends it); the conversation so far stays in the context, the image
in the first turn."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from defocus_vlm.cli_options import add_device

if TYPE_CHECKING:
    from PIL import Image

    from defocus_vlm.inference import VLMAnswerer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported vision-language model directory")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("question", nargs="?", default=None, help="the question (omit for an interactive chat)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    add_device(parser)


def reply(answerer: VLMAnswerer, messages: list[dict], image: Image.Image, max_new_tokens: int,
          out: TextIO | None = None) -> str:
    """Generate the assistant's next turn for ``messages``, printing tokens as they come (to ``out``,
    default: the sys.stdout of the moment, not the one at import time, which may be closed since)."""
    out = out or sys.stdout

    def show(text: str, end: bool) -> None:
        print(text, end="\n" if end else "", file=out, flush=True)

    return answerer.stream_reply(messages, image, show, max_new_tokens)


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.image_io import load_image
    from defocus_vlm.inference import VLMAnswerer

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
