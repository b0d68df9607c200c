"""Print the configuration reference (every config field with its default and meaning) as Markdown,
generated from the code; ``--write docs/configuration.md`` updates that file's generated block in place."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", metavar="FILE", default=None,
                        help="replace the generated block in this Markdown file instead of printing")


def run(args: argparse.Namespace) -> int:
    from defocus_vlm.config_reference import render, write_into

    if args.write is None:
        print(render())
        return 0
    changed = write_into(args.write)
    print(f"{args.write}: {'updated' if changed else 'already up to date'}")
    return 0
