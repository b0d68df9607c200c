"""The small CLI tools: presets, kernels (backend report), bench (tiny sizes; no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch
from defocus_vlm.kernels.registry import usable

from defocus_vlm.cli import build_parser, main


def test_help_lists_every_command(capsys):
    parser = build_parser()
    text = parser.format_help()
    for name in ("presets", "kernels", "convert-official", "bench", "demo"):
        assert name in text


def test_kernels_reports_backends_and_env_override(capsys, monkeypatch):
    assert main(["kernels", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    from defocus_vlm.kernels.selective_scan import auto_backend

    scan = auto_backend("cpu")  # the fused C++ scan where it builds, else the recurrence
    assert scan in ("fused", "reference")
    assert info["ops"]["selective_scan"]["backend"] == scan  # inference and training alike
    assert info["ops_training"]["selective_scan"]["backend"] == scan
    assert info["fused_cpu_ops"]["built"] == (scan == "fused")
    assert info["ops"]["retention"]["backend"] == "parallel"
    monkeypatch.setenv("DEFOCUS_KERNELS", "selective_scan=chunked")
    assert main(["kernels", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = {"backend": "chunked", "chosen_by": "DEFOCUS_KERNELS environment variable"}
    assert info["ops"]["selective_scan"] == expected


def test_bench_kernels_json_rows(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--ops", "selective_scan", "scan_softplus", "retention", "--lengths", "20",
                 "--widths", "small", "--repeats", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    backends = {(r["op"], r["backend"], r["mode"]) for r in result["rows"]}
    assert ("selective_scan", "chunked", "fwd+bwd") in backends
    assert ("selective_scan", "reference", "fwd") in backends
    assert ("retention", "chunkwise", "fwd") in backends
    if usable("selective_scan", "fused", torch.device("cpu")):  # softplus in the kernel vs torch's first
        assert {("scan_softplus", name, "fwd+bwd") for name in ("fused", "fused_softplus_first")} <= backends
    assert all(r["ms"] > 0 for r in result["rows"])


def test_bench_encoders_streaming_columns(capsys):
    assert main(["bench", "encoders", "--presets", "defocus_mamba_small", "--batch-size", "1", "--img-size", "32",
                 "--repeats", "1", "--stream-positions", "4", "40"]) == 0
    result = json.loads(capsys.readouterr().out)
    row = result["rows"][0]
    assert row["model"] == "defocus_mamba_small" and row["stream_step_ms_at_40"] > 0
    assert result["rows"][-1]["model"] == "timm:deit_small_patch16_224"


def test_cuda_request_without_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert main(["bench", "kernels", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def _subcommand_paths(parser, prefix=()):
    """Every command path of the CLI (``("eval", "vqa")`` ...), found from the argparse tree."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _subcommand_paths(sub, (*prefix, name))


def test_every_command_has_working_help(capsys):
    paths = list(_subcommand_paths(build_parser()))
    assert {("eval", "vqa"), ("bench", "stream"), ("data", "easy-vqa"), ("train",)} <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path
        text = capsys.readouterr().out
        assert text.startswith("usage: defocus-vlm " + " ".join(path)), path
        assert len(text.split("\n\n", 1)[-1].strip()) > 20, f"{path}: help has no description"


def test_cli_reexecs_once_with_malloc_tunables(monkeypatch):
    """A real command line (main() without argv) restarts once, through execve, with GLIBC_TUNABLES
    set on glibc Linux; the restarted process (GLIBC_TUNABLES set) does not; a user value and
    DEFOCUS_MALLOC_TUNING=0 are respected; main(argv) from Python never re-executes."""
    import argparse
    import os
    import sys

    from defocus_vlm import cli

    calls = []

    def fake_execve(path, argv, env):  # record, then fail: main carries on in this process
        calls.append((path, argv, env))
        raise OSError("not here")

    ran = argparse.Namespace(command="x", _run=lambda a: 0)
    monkeypatch.setattr(cli, "build_parser", lambda: argparse.Namespace(parse_args=lambda argv: ran))
    monkeypatch.setattr(os, "execve", fake_execve)
    for name in ("GLIBC_TUNABLES", cli.MALLOC_OPT_OUT):
        monkeypatch.delenv(name, raising=False)
    glibc_linux = sys.platform.startswith("linux") and cli._is_glibc()

    assert cli.main(["presets"]) == 0 and calls == []
    assert cli.main() == 0
    if glibc_linux:
        assert calls == [(sys.executable, list(sys.orig_argv), {**os.environ, "GLIBC_TUNABLES": cli.MALLOC_TUNABLES})]
    else:
        assert calls == []
    calls.clear()
    for name, value in (("GLIBC_TUNABLES", cli.MALLOC_TUNABLES), ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2"),
                        (cli.MALLOC_OPT_OUT, "0")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert cli.main() == 0
    assert calls == []
