"""The classification stage end to end on a DeepSpeed engine (CPU accelerator, gloo).

One uninterrupted tiny run is shared (module fixture); resume, export and eval compare with it.
DeepSpeed JIT-builds its small shared-memory comm op once per machine (about a minute, cached
under ~/.cache/torch_extensions); later engine starts take about a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from defocus_vlm.training.checkpoint import LOOP_STATE
from defocus_vlm.training.config import load_config

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
# deterministic, augmentation fully on except what cannot match across process counts
BASE = ["train.progress=false", "train.tensorboard=true", "data.verify=8", "train.checkpoint_every=3"]


def tiny(tmp: Path, *extra: str):
    return load_config("tiny_cpu", BASE + [f"train.output_dir={tmp}", *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from defocus_vlm.training.classification import run

    out = tmp_path_factory.mktemp("full")
    return out, run(tiny(out))


def test_one_step_changes_weights_and_lowers_loss():
    from defocus_vlm.training.classification import build_model_config
    from defocus_vlm.training.engine import build_engine, deepspeed_config, init_distributed
    from defocus_vlm.training.optim import build_optimizer

    from defocus_vlm import DefocusVisionForImageClassification

    init_distributed()
    cfg = load_config("tiny_cpu")
    torch.manual_seed(0)
    model = DefocusVisionForImageClassification(build_model_config(cfg, [str(i) for i in range(10)]))
    engine = build_engine(
        model, build_optimizer(model, cfg.optim, 3e-3), deepspeed_config("zero0", 16, 16, 1, 10.0, False)
    )
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    loss0 = engine(pixel_values=x, labels=y, drop_path_rate=0.0).loss
    engine.backward(loss0)
    engine.step()
    after = engine.module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "head.weight" in changed and any("blocks" in k or "mixer" in k for k in changed)
    with torch.no_grad():
        loss1 = engine(pixel_values=x, labels=y, drop_path_rate=0.0).loss
    assert loss1.item() < loss0.item()


def test_full_run_outputs(full_run):
    out, summary = full_run
    assert summary["steps"] == 16 and len(summary["losses"]) == 16
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    for name in (
        "config.yaml",
        "history.jsonl",
        "metrics.json",
        "training_curve.png",
        "losses.json",
        "checkpoints/latest",
        "model/config.json",
        "model/model.safetensors",
        "model/preprocessor_config.json",
        "model/raw/model.safetensors",
    ):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert tag == "step_16" and not list((out / "checkpoints").glob(".tmp-*"))
    assert len(list((out / "checkpoints").glob("step_*"))) <= 2  # keep_checkpoints
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["id2label"]["0"] == "T-shirt/top" and len(cfg["id2label"]) == 10


def test_resume_reproduces_uninterrupted_losses(full_run, tmp_path):
    from defocus_vlm.training.classification import run

    _, full = full_run
    first = run(tiny(tmp_path, "train.stop_after=5"))  # mid-epoch (8 steps per epoch)
    assert first.get("interrupted") and len(first["losses"]) == 5
    with pytest.raises(ValueError, match="--resume"):
        run(tiny(tmp_path))
    original = (tmp_path / "config.yaml").read_text()
    # a run killed after its step-5 checkpoint had logged steps 6 and 7 (and half a line) already
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 9.0, "lr": 0.1}\n{"step": 7, "loss": 9.0, "lr": 0.1}\n{"step": 8, "lo')
    second = run(tiny(tmp_path, "train.stop_after=11"), resume=True)
    assert second.get("interrupted")
    before = json.loads((tmp_path / "checkpoints" / "step_11" / LOOP_STATE).read_text())["wall_s"]
    rest = run(tiny(tmp_path), resume=True)
    assert rest["losses"] == full["losses"]  # exact, not approximate
    assert rest["val"] == full["val"]
    # the run's wall time counts its segments up to their last checkpoints, not only the last one's
    assert full["wall_s_total"] == full["wall_s"] and before > 0
    assert rest["wall_s_total"] == pytest.approx(before + rest["wall_s"], abs=0.02)
    records = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 17))  # each step once, the killed run's 6 and 7 replaced by the resumed ones
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx(full["losses"])
    # the original config stays; each resume is recorded with what it changed
    assert (tmp_path / "config.yaml").read_text() == original
    first_resume = (tmp_path / "config.resume-1.yaml").read_text()
    assert first_resume.startswith("# resume 1 from step_5; changed: train.stop_after: 5 -> 11")
    assert "train.stop_after: 11 -> 0" in (tmp_path / "config.resume-2.yaml").read_text().splitlines()[0]


def test_resume_is_exact_on_the_batch_augmentation(tmp_path):
    """The decoded-tensor path (augment.engine=batch) seeds each sample from the sampler: resume stays exact."""
    from defocus_vlm.training.classification import ClassificationTask, run

    from defocus_vlm.data.decoded import DecodedDataset

    batch = ["augment.engine=batch", "augment.rand_augment=null", "augment.color_jitter=0", "train.max_steps=6",
             "data.limit_val=32"]
    assert isinstance(ClassificationTask(tiny(tmp_path / "probe", *batch)).build_data(), DecodedDataset)
    full = run(tiny(tmp_path / "full", *batch))
    assert run(tiny(tmp_path / "cut", *batch, "train.stop_after=3")).get("interrupted")
    rest = run(tiny(tmp_path / "cut", *batch), resume=True)
    assert rest["losses"] == full["losses"] and rest["val"] == full["val"]


def test_export_reloads_and_evaluates_to_same_accuracy(full_run):
    from defocus_vlm.eval.classification import run_classification_eval
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    out, summary = full_run
    result = run_classification_eval(out / "model", "/usr/share/datasets/fashion-mnist", limit=128)
    assert result["ema"] == summary["val"]["ema"]
    assert result["raw"] == summary["val"]["raw"]
    model = AutoModelForImageClassification.from_pretrained(out / "model")
    assert type(model).__name__ == "DefocusVisionForImageClassification"
    clf = pipeline("image-classification", model=str(out / "model"))
    preds = clf(Image.new("L", (28, 28), 128), top_k=3)
    assert len(preds) == 3 and preds[0]["label"] in model.config.id2label.values()


def test_two_process_zero2_matches_one_process(tmp_path):
    """Same global batch (16): 1 process x 16 vs 2 processes x 8 under torchrun, ZeRO-2, gloo."""
    from defocus_vlm.training.classification import run

    common = [
        "train.batch_size=16",
        "train.epochs=1",
        "train.max_steps=4",
        "augment.mixup=0",
        "augment.cutmix=0",
        "train.drop_path_max=0",
        "train.deepspeed=zero2",
        "train.ema_decay=0",
        "data.limit_val=32",
    ]
    one = run(tiny(tmp_path / "one", *common))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    from defocus_vlm.training.engine import _free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "defocus_vlm.cli",
        "train",
        "classification",
        "--config",
        "tiny_cpu",
        *BASE,
        *common,
        f"train.output_dir={tmp_path / 'two'}",
    ]
    # generous: a fresh machine's first multi-process run JIT-builds DeepSpeed's shm op (~90 s)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == 2 and one["zero_stage"] == 2
    assert len(two) == len(one["losses"]) == 4
    assert two == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert metrics["val"]["raw"]["samples"] == 32


def test_cli_train_print_config_and_errors(capsys):
    from defocus_vlm.cli import main

    assert main(["train", "classification", "--config", "tiny_cpu", "train.epochs=3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 3
    assert main(["train", "classification", "--config", "tiny_cpu", "train.epoks=3"]) == 2
    assert "did you mean train.epochs" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "classification",
                "--config",
                "tiny_cpu",
                "data.path=/nonexistent",
                "data.source=fashion_mnist",
            ]
        )
        == 2
    )
    assert "/nonexistent" in capsys.readouterr().err
