"""``defocus-vlm bench train`` at tiny sizes (no timing asserts): every contender runs, the phase split adds
up to the step, the project contender steps the real training loop, and a recipe the bare loop cannot
reproduce is refused."""

from __future__ import annotations

import json

import pytest
import torch

from defocus_vlm.cli import main

torch.set_num_threads(1)
TINY = ["train.batch_size=8", "data.limit_train=32", "data.limit_val=8", "model.vision.overrides.depth=1"]


def test_bench_train_json_and_phase_split(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--config", "fashion_defocus_vit", *TINY, "--steps", "1", "--rounds", "2",
                 "--pil", "--kernels", "attention=reference", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["contenders"]) == {"project", "pil_data", "kernels:attention=reference", "bare", "timm"}
    for name, row in result["contenders"].items():
        ms = row["median_ms"]
        assert row["steps"] == 2 and row["img_per_s"] > 0, name
        assert all(ms[p] >= 0 for p in ("data", "fwd", "bwd", "opt")) and ms["fwd"] > 0 and ms["bwd"] > 0, name
    # a single timed step per contender and round: the medians of two steps still add up within rounding
    project = result["contenders"]["project"]["median_ms"]
    assert sum(project[p] for p in ("data", "fwd", "bwd", "opt", "loop")) == pytest.approx(project["step"], abs=0.1)
    assert result["contenders"]["bare"]["median_ms"]["loop"] == 0
    assert set(result["ratios"]) >= {"step_project_vs_bare", "step_project_vs_timm", "data_project_vs_bare"}
    assert result["overrides"] == TINY and result["batch"] == 8
    assert "pil_data" in capsys.readouterr().err  # the table


def test_bench_train_project_contender_runs_the_training_loop(tmp_path):
    from defocus_vlm.training.config import load_config

    from defocus_vlm.bench.train import _Project
    from defocus_vlm.data.decoded import DecodedDataset

    cfg = load_config("fashion_defocus_vit", [*TINY, "train.progress=false", "train.tensorboard=false",
                                              f"train.output_dir={tmp_path}"])
    project = _Project(cfg, "project")
    assert isinstance(project.run.train_ds, DecodedDataset)
    for _ in range(5):  # 4 steps an epoch: the fifth starts the next epoch
        times = project.step()
    assert project.run.global_step == 5 and project.run.epoch == 1 and times["fwd"] > 0
    assert project.run.engine is project.engine  # the timing stand-in is gone after the step


def test_bench_train_refuses_a_recipe_the_bare_loop_cannot_copy(capsys):
    assert main(["bench", "train", "--config", "tiny_cpu", "--steps", "1", "--rounds", "1"]) == 2
    assert "augment.rand_augment" in capsys.readouterr().err
