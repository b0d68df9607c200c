"""``defocus-vlm`` command line. Each command lives in its own module under
``defocus_vlm.commands`` and is imported only when it runs, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module under defocus_vlm.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("presets", "list the model presets with their sizes"),
    "kernels": ("kernels", "show which kernel backend each op uses here, and why"),
    "convert-official": ("convert_official", "convert an official De-focus Mamba checkpoint to an HF directory"),
    "bench": ("bench", "benchmarks with JSON output (kernels, encoders, stream)"),
    "demo": ("demo", "run the main job end to end: three stages, evaluations, a picture, a table"),
    "train": ("train", "train a stage (classification | clip | instruct): train STAGE --config FILE [key=value ...]"),
    "eval": ("evaluate", "evaluate a model (classification | zeroshot | retrieval | vqa): eval TASK --model DIR ..."),
    "classify": ("classify", "classify images with an exported model"),
    "chat": ("chat", "ask a vision-language model about an image (one answer, or an interactive chat)"),
    "config-reference": ("config_reference", "print every config field with its default and meaning (Markdown)"),
    "analyze": ("analyze", "over-focus diagnostics: attention, receptive-field and gradient maps per layer"),
    "data": ("data", "prepare data sets as LLaVA JSON + images: easy-vqa | shapes-vqa --output-dir DIR"),
    "merge-lora": ("merge_lora", "fold a LoRA adapter into its VLM: defocus-vlm merge-lora --model DIR --out DIR"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defocus-vlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"defocus_vlm.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        print(f"defocus-vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
