"""The command-line options several commands share, spelled one way everywhere: ``--device`` (default
``auto``: CUDA when available, else the CPU; resolved by :func:`defocus_vlm.inference.resolve_device`),
``--output-dir`` for a folder a command writes, ``--output`` for one file. The older spelling ``--out``
stays accepted for both, hidden from ``--help``. ``tests/test_cli_options.py`` walks every command's
parser and holds each one to these conventions."""

from __future__ import annotations

import argparse

DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: auto)"
OLD_OUTPUT_FLAG = "--out"


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def _add_output(parser: argparse.ArgumentParser, flag: str, help: str, required: bool, default: str | None) -> None:
    # a mutually exclusive pair: either spelling satisfies ``required``, and only one may be given
    dest = flag.lstrip("-").replace("-", "_")
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(flag, dest=dest, default=default, help=help)
    group.add_argument(OLD_OUTPUT_FLAG, dest=dest, default=default, help=argparse.SUPPRESS)


def add_output_dir(parser: argparse.ArgumentParser, help: str, required: bool = True,
                   default: str | None = None) -> None:
    """``--output-dir`` (``args.output_dir``): the folder a command writes."""
    _add_output(parser, "--output-dir", help, required, default)


def add_output_file(parser: argparse.ArgumentParser, help: str = "also write the JSON to this file",
                    required: bool = False) -> None:
    """``--output`` (``args.output``): the one file a command writes."""
    _add_output(parser, "--output", help, required, None)
