"""The demo pipeline end to end in its fast mode (two training steps per stage): every step runs as
its CLI command, writes what the next one reads, and a second run reuses everything."""

from __future__ import annotations

import json

import pytest

from defocus_vlm.cli import main as cli_main
from defocus_vlm.demo import demo_steps, run_demo


def test_demo_fast_runs_every_stage_then_reuses_them(tmp_path, capsys):
    calls: list[list[str]] = []

    def run_command(argv: list[str]) -> int:
        calls.append(argv)
        return cli_main(argv)

    result = run_demo(tmp_path, fast=True, run_command=run_command)
    steps = demo_steps(tmp_path, fast=True)
    assert [c[:2] for c in calls] == [s.argv[:2] for s in steps]
    rows = {r["stage"]: r for r in result["rows"]}
    assert set(rows) == {"1 classification", "2 CLIP", "3 VLM"}
    for row in rows.values():  # every metric was produced and read back
        assert row["value"] is not None and 0.0 <= row["value"] <= 100.0
        assert row["train_s"] is not None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == result["rows"]
    assert (tmp_path / "focus" / "summary.png").is_file()
    # the exported models load with the Auto classes the README names
    from transformers import AutoModelForImageClassification, AutoModelForImageTextToText

    assert AutoModelForImageClassification.from_pretrained(tmp_path / "stage1" / "model").config.num_labels == 10
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "stage3" / "model") is not None

    calls.clear()
    again = run_demo(tmp_path, fast=True, run_command=run_command)
    assert calls == []  # nothing re-run
    assert again["rows"] == result["rows"]
    assert "reused" in capsys.readouterr().out


def test_demo_step_failure_names_the_command(tmp_path):
    with pytest.raises(RuntimeError, match="defocus-vlm train classification"):
        run_demo(tmp_path, fast=True, run_command=lambda argv: 2)
