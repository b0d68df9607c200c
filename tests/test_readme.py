"""Every ```python block of the README runs; every command of its ```bash blocks parses with the CLI
(and a training command's config loads)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("\n\n", 2)[1]
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def _shell_commands() -> list[str]:
    """Every command of the README's ```bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _cli_argv(command: str) -> list[str] | None:
    """The defocus-vlm arguments of a command typed directly or through torchrun / deepspeed / python -m."""
    words = shlex.split(command)
    if words[0] == "defocus-vlm":
        return words[1:]
    if "defocus_vlm.cli" in words:
        return words[words.index("defocus_vlm.cli") + 1:]
    return None


COMMANDS = _shell_commands()


def test_readme_commands_are_known():
    makefile = (README.parent / "Makefile").read_text()
    for command in COMMANDS:
        words = shlex.split(command)
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", makefile, flags=re.M), command
        else:
            assert _cli_argv(command) is not None or words[0] in {"lmms-eval", "pip", "export", "cat"}, command


@pytest.mark.parametrize("command", [c for c in COMMANDS if _cli_argv(c) is not None])
def test_readme_cli_command_parses_and_its_config_loads(command):
    """Every defocus-vlm command line in the README parses with today's CLI, and a training command's
    config file + overrides load (so renamed options or config keys fail here)."""
    from defocus_vlm.training.config import load_config

    from defocus_vlm.cli import build_parser

    args = build_parser().parse_args(_cli_argv(command))
    if args.command == "train":
        config_file, *more = args.config
        load_config(config_file, list(args.overrides) + more, stage=args.stage)


def test_readme_config_reference_is_generated_from_the_code():
    from defocus_vlm.config_reference import END, START, render, undocumented

    assert undocumented() == [], "every config field needs a meaning (a trailing # comment or a docstring entry)"
    text = (README.parent / "docs" / "configuration.md").read_text()
    block = START + text.split(START, 1)[1].split(END, 1)[0] + END
    assert block == render(), "docs/configuration.md is stale: run `defocus-vlm config-reference --write " \
                              "docs/configuration.md`"
