"""``defocus-vlm`` command line. Each command lives in its own module under
``defocus_vlm.commands`` and is imported only when it runs, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import os
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
    "merge-lora": ("merge_lora", "fold a LoRA adapter into its VLM: merge-lora --model DIR --output-dir DIR"),
}


# glibc's malloc hands large freed blocks back to the OS (mmap threshold, heap trimming) and every
# training step then faults the same pages in again: with the fused scan off, a De-focus Mamba tiny
# step spends half its time there. Raising both thresholds keeps the memory in the process (its
# resident size stays at the peak). mallopt() from inside the process caps the mmap threshold at
# 32 MB, which recovers much less, so the CLI re-executes itself once with the tunables set
# (benchmarks/README.md, "Allocator"). Opt out: DEFOCUS_MALLOC_TUNING=0; a GLIBC_TUNABLES value
# the user set is kept as it is.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"
MALLOC_OPT_OUT = "DEFOCUS_MALLOC_TUNING"


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not a glibc system
        return False


def malloc_reexec_command(environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]] | None:
    """(argv, environment) to re-execute this process with :data:`MALLOC_TUNABLES`, or None when
    it should run as it is: opted out, GLIBC_TUNABLES already set, not glibc Linux, or the original
    command line unknown."""
    env = dict(os.environ if environ is None else environ)
    if env.get(MALLOC_OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if "GLIBC_TUNABLES" in env or not sys.platform.startswith("linux") or not _is_glibc():
        return None
    argv = list(getattr(sys, "orig_argv", []) or [])
    if not argv:
        return None
    env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    return argv, env


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
    if argv is None:  # a real command line (not a call from Python): start over with the allocator tuned
        command = malloc_reexec_command()
        if command is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                os.execve(sys.executable, *command)
            except OSError:  # could not re-execute: carry on with the allocator as it is
                pass
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        print(f"defocus-vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
