"""The demo pipeline end to end in its fast mode (two training steps per stage): every step runs as
its CLI command, writes what the next one reads (the chain hands each stage the previous stage's
tower), and a second run reuses everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from defocus_vlm.cli import main as cli_main
from defocus_vlm.demo import FASHION, SOURCE_KEY, STAGE1, STAGE2, STAGE3, demo_steps, run_demo


def test_demo_fast_runs_every_stage_then_reuses_them(tmp_path, capsys):
    calls: list[list[str]] = []

    def run_command(argv: list[str]) -> int:
        calls.append(argv)
        return cli_main(argv)

    result = run_demo(tmp_path, fast=True, run_command=run_command, jobs=1)
    steps = demo_steps(tmp_path, fast=True)
    assert [c[:2] for c in calls] == [s.argv[:2] for s in steps]
    rows = result["rows"]
    assert [r["stage"] for r in rows] == [FASHION, STAGE1, STAGE2, STAGE2, STAGE3]
    for row in rows:  # every metric was produced and read back
        values = row["value"] if isinstance(row["value"], list) else [row["value"]]
        assert values and all(v is not None and 0.0 <= v <= 100.0 for v in values), row
        assert row["train_s"] is not None
    # the chain: stage 2 starts from stage 1's export, stage 3 from stage 2's; the table says so
    starts = {r["stage"]: r["from"] for r in rows}
    assert starts[STAGE2] == str(tmp_path / "stage1" / "model") and starts[STAGE3] == str(tmp_path / "stage2" / "model")
    assert starts[FASHION].startswith("defocus_vit_tiny") and starts[STAGE1].startswith("defocus_vit_tiny")
    assert "`" + str(tmp_path / "stage1" / "model") + "`" in (tmp_path / "results.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == result["rows"]
    assert (tmp_path / "focus" / "summary.png").is_file()
    # the exported models load with the Auto classes the README names
    from transformers import AutoModelForImageClassification, AutoModelForImageTextToText

    assert AutoModelForImageClassification.from_pretrained(tmp_path / "fashion" / "model").config.num_labels == 10
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "stage1" / "model").config.num_labels == 24
    vlm = AutoModelForImageTextToText.from_pretrained(tmp_path / "stage3" / "model")
    assert vlm.config.vision_config.embed_dim == 128  # stage 1's tower, carried through stage 2

    calls.clear()
    again = run_demo(tmp_path, fast=True, run_command=run_command, jobs=1)
    assert calls == []  # nothing re-run
    assert again["rows"] == result["rows"]
    assert "reused" in capsys.readouterr().out


def test_demo_step_failure_names_the_command(tmp_path):
    with pytest.raises(RuntimeError, match="defocus-vlm train classification"):
        run_demo(tmp_path, fast=True, run_command=lambda argv: 2, jobs=1)


def _fake_step(steps, calls: list, lane: str):
    def run(argv: list[str], *log) -> int:
        calls.append((lane, argv, *log))
        step = next(s for s in steps if s.argv == [a for a in argv if a != "--resume"])
        Path(step.output).parent.mkdir(parents=True, exist_ok=True)
        Path(step.output).write_text("{}")
        return 0
    return run


def test_two_lanes_run_side_by_side_in_order(tmp_path):
    """jobs=2: stage 1 and its readers in the foreground, stages 2-3 through the background runner
    (one log per step), each lane in pipeline order; the table is still written."""
    steps = demo_steps(tmp_path, fast=True)
    calls: list = []
    run_demo(tmp_path, fast=True, jobs=2, run_command=_fake_step(steps, calls, "fg"),
             background_command=_fake_step(steps, calls, "bg"))
    fg = [c[1] for c in calls if c[0] == "fg"]
    bg = [c for c in calls if c[0] == "bg"]
    assert fg == [s.argv for s in steps if s.lane == 0] and len(fg) == 3
    assert [c[1] for c in bg] == [s.argv for s in steps if s.lane == 1] and len(bg) == 6
    assert [c[2].name for c in bg][:2] == ["4_data_easy_vqa_llava_json_colour_shape_classes.log",
                                           "5_stage_1_classification_easy_vqa_colour_shape_classes.log"]
    assert (tmp_path / "results.md").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["lanes"] == 2


def test_a_failing_background_step_fails_the_demo(tmp_path):
    steps = demo_steps(tmp_path, fast=True)
    with pytest.raises(RuntimeError, match="defocus-vlm data easy-vqa"):
        run_demo(tmp_path, fast=True, jobs=2, run_command=_fake_step(steps, [], "fg"),
                 background_command=lambda argv, log: 3)


def test_each_chain_stage_starts_from_the_previous_stage_export(tmp_path):
    steps = {s.name: s for s in demo_steps(tmp_path)}
    assert steps[STAGE1].source() is None  # stage 1: its config's preset, from scratch
    assert steps[STAGE2].source() == str(tmp_path / "stage1" / "model")
    assert steps[STAGE3].source() == str(tmp_path / "stage2" / "model")
    assert all(not a.startswith(SOURCE_KEY) for a in steps[FASHION].argv)


def test_an_interrupted_training_step_resumes_from_its_checkpoint(tmp_path):
    """A training step whose run directory holds a checkpoint (the demo was interrupted) runs with
    --resume, which the training run requires there; a finished-or-fresh one runs as written."""
    steps = {s.name: s for s in demo_steps(tmp_path)}
    assert steps[STAGE1].command() == steps[STAGE1].argv
    (tmp_path / "stage1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "stage1" / "checkpoints" / "latest").write_text("step_55\n")
    assert steps[STAGE1].command() == [*steps[STAGE1].argv, "--resume"]
    assert steps[STAGE2].command() == steps[STAGE2].argv
    calls: list = []
    run_demo(tmp_path, fast=True, jobs=1, run_command=_fake_step(demo_steps(tmp_path, fast=True), calls, "fg"))
    last_words = [c[1][-1] for c in calls if c[1][:2] == ["train", "classification"]]
    assert last_words == [f"train.output_dir={tmp_path / 'fashion'}", "--resume"]  # Fashion-MNIST, then stage 1


def test_subprocess_steps_log_the_command_output(tmp_path, monkeypatch):
    from defocus_vlm.demo import SubprocessSteps

    # a training step of the foreground lane leaves its rendezvous in os.environ; a child must not reuse it
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("DEFOCUS_KERNELS", "reference")
    env = SubprocessSteps.child_env()
    assert "MASTER_PORT" not in env and "RANK" not in env and env["DEFOCUS_KERNELS"] == "reference"

    runner = SubprocessSteps()
    assert runner(["presets"], tmp_path / "logs" / "presets.log") == 0
    assert "defocus_mamba_small" in (tmp_path / "logs" / "presets.log").read_text()
    runner.stop()
    assert runner(["presets"], tmp_path / "logs" / "again.log") == -1  # stopped: no new step starts
