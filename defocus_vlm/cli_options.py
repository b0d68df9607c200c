"""The command-line options several commands share, spelled one way everywhere: ``--device`` (default
``auto``: CUDA when available, else the CPU), ``--output-dir`` for a folder a command writes, ``--output``
for one JSON file. The older spellings (``--out``) stay accepted as aliases."""

from __future__ import annotations

import argparse

DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: auto)"


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_output_dir(parser: argparse.ArgumentParser, help: str, required: bool = True,
                   default: str | None = None) -> None:
    parser.add_argument("--output-dir", "--out", dest="output_dir", required=required, default=default, help=help)


def add_output_file(parser: argparse.ArgumentParser, help: str = "also write the JSON to this file") -> None:
    parser.add_argument("--output", "--out", dest="output", default=None, help=help)
