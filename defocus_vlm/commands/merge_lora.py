"""Merge a LoRA adapter into its VLM: ``defocus-vlm merge-lora --model DIR --output-dir DIR``.

DIR is the ``model/`` folder of a LoRA instruct run (the adapter, with its base model in ``base/``)
or any peft adapter folder whose ``base_model_name_or_path`` is a local VLM. The output is a plain
VLM directory with the processor, loadable with ``AutoModelForImageTextToText``."""

from __future__ import annotations

import argparse
import json
import sys

from defocus_vlm.cli_options import add_output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="LoRA adapter directory (a LoRA run's model/ folder)")
    add_output_dir(parser, help="where the merged model goes")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from defocus_vlm.training.lora import merge_lora

    if Path(args.output_dir).resolve() == Path(args.model).resolve():
        raise ValueError("--output-dir must differ from --model (the adapter would be overwritten)")
    out = merge_lora(args.model, args.output_dir)
    print(json.dumps({"merged": str(out)}), file=sys.stdout)
    return 0
