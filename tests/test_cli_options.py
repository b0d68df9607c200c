"""Every command's flags follow defocus_vlm/cli_options.py: ``--output-dir`` for a folder, ``--output``
for a file (each with the old ``--out`` as a hidden alias), ``--device`` defaulting to ``auto`` wherever
a command runs a model. The parsers are walked, so a new command or sub-command is checked too."""

from __future__ import annotations

import argparse
import re

import pytest

from defocus_vlm.cli import build_parser
from defocus_vlm.cli_options import DEVICE_HELP, OLD_OUTPUT_FLAG

OUTPUT_FLAGS = {"--output-dir": "output_dir", "--output": "output"}
# Commands that take no --device, and why. A new command must either take add_device() or be added here.
WITHOUT_DEVICE = {
    "presets": "lists presets, runs no model",
    "config-reference": "prints the configuration reference",
    "convert-official": "converts weights on the CPU",
    "data easy-vqa": "writes data files",
    "data shapes-vqa": "writes data files",
    "eval vqa-samples": "draws answers already in eval vqa outputs, runs no model",
    "merge-lora": "folds weights on the CPU",
    "train": "the run config and the launcher place the processes",
    "demo": "runs the training stages, placed like train",
    "bench gpu": "the GPU check uses CUDA (its dry run the CPU) by design",
}


def leaf_parsers(parser: argparse.ArgumentParser, path: str = "") -> dict[str, argparse.ArgumentParser]:
    """'bench kernels' -> its parser, for every command that has no further sub-commands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {path: parser}
    found = {}
    for action in subs:
        for name, child in action.choices.items():
            found |= leaf_parsers(child, f"{path} {name}".strip())
    return found


LEAVES = leaf_parsers(build_parser())


def visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def test_the_walk_finds_the_nested_commands():
    assert {"bench kernels", "bench gpu", "eval vqa", "data shapes-vqa", "chat"} <= set(LEAVES)


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_output_flags_are_spelled_one_way(command):
    parser = LEAVES[command]
    for action in visible(parser):
        for flag in action.option_strings:
            if re.match(r"--out(put)?([-_]|$)", flag):
                assert flag in OUTPUT_FLAGS, f"{command}: {flag} (use --output-dir for a folder, --output for a file)"
                assert action.dest == OUTPUT_FLAGS[flag] and action.option_strings == [flag], f"{command}: {flag}"
        if not action.option_strings:
            assert "out" not in action.dest, f"{command}: the output is a positional ({action.dest}); use --output-dir"


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_the_old_out_flag_is_a_hidden_alias(command):
    parser = LEAVES[command]
    outputs = [a for a in visible(parser) if set(a.option_strings) & set(OUTPUT_FLAGS)]
    old = [a for a in parser._actions if OLD_OUTPUT_FLAG in a.option_strings]
    assert len(old) == len(outputs) <= 1, f"{command}: --out without --output/--output-dir, or twice"
    for new, alias in zip(outputs, old, strict=True):
        assert alias.help is argparse.SUPPRESS and alias.option_strings == [OLD_OUTPUT_FLAG]
        assert (alias.dest, alias.default) == (new.dest, new.default)
        together = [g for g in parser._mutually_exclusive_groups if new in g._group_actions]
        assert together and alias in together[0]._group_actions, f"{command}: --out and {new.option_strings[0]}"


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_device_defaults_to_auto_wherever_a_model_runs(command):
    devices = [a for a in LEAVES[command]._actions if "--device" in a.option_strings]
    if command in WITHOUT_DEVICE:
        assert not devices, f"{command} takes --device now: remove it from WITHOUT_DEVICE"
        return
    assert len(devices) == 1, f"{command} runs a model but has no --device (cli_options.add_device)"
    device = devices[0]
    assert (device.option_strings, device.default, device.choices, device.help) == (
        ["--device"], "auto", None, DEVICE_HELP)


def test_without_device_names_real_commands():
    assert set(WITHOUT_DEVICE) <= set(LEAVES)


def test_required_output_dir_accepts_either_spelling_and_refuses_both(capsys):
    parser = LEAVES["merge-lora"]
    assert parser.parse_args(["--model", "m", "--out", "d"]).output_dir == "d"
    assert parser.parse_args(["--model", "m", "--output-dir", "d"]).output_dir == "d"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m"])
    assert "--output-dir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--out", "d", "--output-dir", "e"])
    assert not re.search(r"--out(?!put)", parser.format_help())


def test_convert_official_takes_output_dir_or_the_old_positional(capsys):
    from defocus_vlm.cli import main

    parser = LEAVES["convert-official"]
    assert parser.parse_args(["c.pth", "--output-dir", "d"]).output_dir == "d"
    assert parser.parse_args(["c.pth", "d"]).positional_output_dir == "d"
    for argv in (["c.pth"], ["c.pth", "d", "--output-dir", "e"]):
        assert main(["convert-official", *argv]) == 2
        assert "give the output directory once" in capsys.readouterr().err
