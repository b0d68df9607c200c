"""--resume is safe: a changed config that would break exactness is refused (listing every difference,
before DeepSpeed is touched), allowed changes are recorded; nothing in a run directory is unpickled
(a planted code-executing pickle is refused and never runs); checkpoints of the earlier layout load."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from defocus_vlm.training import STAGES
from defocus_vlm.training import checkpoint as ckpt
from defocus_vlm.training.config import load_config
from defocus_vlm.training.fields import num, resume_changes
from defocus_vlm.training.run_dir import config_yaml

BASE = ["train.progress=false", "train.tensorboard=false"]
# the fields --resume may change, for every stage (a field is fixed unless it declares resume_free)
FREE = {"data.num_workers", "data.on_corrupt", "data.verify", "train.micro_batch_size", "train.stop_after",
        "train.cpu_threads", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
        "train.eval_batch_size", "train.log_every", "train.output_dir", "train.tensorboard", "train.progress"}


def _free_keys(section, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            keys |= _free_keys(value, f"{prefix}{f.name}.")
        elif f.metadata.get("resume_free"):
            keys.add(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_only_declared_fields_may_change_on_resume(stage):
    assert _free_keys(STAGES[stage].config_class()()) == FREE


def test_resume_changes_splits_by_declaration():
    saved = yaml.safe_load(config_yaml(load_config("tiny_cpu")))
    new = load_config("tiny_cpu", ["train.batch_size=64", "model.vision.overrides.embed_dim=64", "optim.lr=0.1",
                                   "train.stop_after=3", "train.log_every=5"])
    fixed, free = resume_changes(saved, new)
    assert fixed == ["model.vision.overrides: {'patch_size': 7, 'embed_dim': 32, 'depth': 2, 'dt_rank': 4, "
                     "'group_norm_size': 16} -> {'patch_size': 7, 'embed_dim': 64, 'depth': 2, 'dt_rank': 4, "
                     "'group_norm_size': 16}", "optim.lr: 0.003 -> 0.1", "train.batch_size: 32 -> 64"]
    assert free == ["train.stop_after: 0 -> 3", "train.log_every: 1 -> 5"]
    assert resume_changes(saved, load_config("tiny_cpu")) == ([], [])

    @dataclasses.dataclass
    class Section:  # a field without a declaration is fixed
        plain: int = 1
        ranged: int = num(1, ge=0)

    assert resume_changes({"plain": 2, "ranged": 2}, Section()) == (["plain: 2 -> 1", "ranged: 2 -> 1"], [])


def _fake_checkpoint(run: Path, cfg) -> Path:
    step = run / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / ckpt.CONFIG_FILE).write_text(config_yaml(cfg))
    (run / "checkpoints" / "latest").write_text("step_3")
    (run / "config.yaml").write_text(config_yaml(cfg))
    return step


def test_cli_refuses_a_changed_model_on_resume_in_one_line(tmp_path, capsys):
    from defocus_vlm.cli import main

    run = tmp_path / "run"
    _fake_checkpoint(run, load_config("tiny_cpu", [*BASE, f"train.output_dir={run}"]))
    before = (run / "config.yaml").read_text()
    code = main(["train", "classification", "--config", "tiny_cpu", *BASE, f"train.output_dir={run}",
                 "model.vision.overrides.embed_dim=64", "train.batch_size=64", "train.log_every=3", "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("defocus-vlm train: error: --resume with a changed config: model.vision.overrides: ")
    assert "'embed_dim': 64" in err and "train.batch_size: 32 -> 64" in err and "log_every" not in err
    assert (run / "config.yaml").read_text() == before and not list(run.glob("config.resume-*"))
    # DeepSpeed never saw the checkpoint (the fake one has no weights: loading it would have failed differently)
    assert "DeepSpeed" not in err


# --------------------------------------------------------------------------- no pickles
class Planted:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _engine():
    from defocus_vlm.training.engine import build_engine, deepspeed_config, init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                        deepspeed_config("zero0", 2, 2, 1, 1.0, False))


def test_checkpoint_round_trip_without_pickles(tmp_path):
    engine = _engine()
    ema = {"weight": torch.arange(8.0).reshape(2, 4)}
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = ckpt.save(engine, tmp_path, 3, {"global_step": 3, "losses": [1.5, 1.25]}, ema, "a: 1\n")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    assert sorted(p.name for p in path.iterdir() if not p.name.endswith(".pt")) == [
        "config.yaml", "ema.safetensors", "loop_state.json", "rng_rank0.safetensors"]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state = ckpt.load(_engine(), tmp_path)
    assert state["global_step"] == 3 and state["losses"] == [1.5, 1.25] and torch.equal(state["ema"]["weight"],
                                                                                      ema["weight"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


@pytest.mark.parametrize("target", ["mp_rank_00_model_states.pt", "rng_rank0.pt"])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, target):
    engine = _engine()
    path = ckpt.save(engine, tmp_path / "ckpt", 1, {"global_step": 1}, None, "")
    marker = tmp_path / "marker"
    if target == "rng_rank0.pt":  # a checkpoint of the earlier layout: the RNG state was a pickle
        (path / "rng_rank0.safetensors").unlink()
    torch.save({"payload": Planted(marker)}, path / target)
    refused = f"refusing to load {path / target}: its pickle references getattr, but"
    with pytest.raises(ckpt.CheckpointError, match=refused):
        ckpt.load(engine, tmp_path / "ckpt")
    assert not marker.exists()
    torch.load(path / target, weights_only=False)  # the plant is real: an unsafe load runs it
    assert marker.read_text() == "pwned"


def test_checkpoint_of_the_earlier_layout_loads_safely(tmp_path):
    engine = _engine()
    root = tmp_path / "ckpt"
    client = {"epoch": 1, "step_in_epoch": 0, "global_step": 4, "losses": [2.0], "extra": {}, "total_steps": 8,
              "ema": {"weight": torch.ones(2, 4)}}
    engine.save_checkpoint(str(root), tag="step_4", client_state=client, save_latest=False)
    (root / "latest").write_text("step_4")
    np.random.seed(3)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": None}, root / "step_4" / "rng_rank0.pt")
    expected = np.random.rand()
    np.random.seed(0)
    state = ckpt.load(_engine(), root)
    assert state["global_step"] == 4 and torch.equal(state["ema"]["weight"], torch.ones(2, 4))
    assert np.random.rand() == expected
    assert json.dumps(state["losses"]) == "[2.0]"
